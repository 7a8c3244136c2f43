"""wrap_from_hydra, TorchDecoder, import stubs and Hydra composition against a fake upstream."""

import sys
from pathlib import Path

import pytest
import torch

import upstream_fixtures as uf
from diff3r_plugin.errors import UnknownAdapterError
from diff3r_plugin.integration.upstream import (DecoderOutput, TorchDecoder, compose_upstream_config,
                                                install_import_stubs, wrap_from_hydra)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

CHEAP = {"steps": 1, "inner_solver": "adam", "pcg_maxiter": 5, "lambda_mode": "constant"}


def test_wrap_from_hydra_autodetects_and_reads_node():
    enc = uf.build("noposplat")
    cfg = {"diff3r": dict(CHEAP, steps=3), "optimizer": {"lr": 1e-4},
           "model": {"decoder": {"background_color": [1.0, 1.0, 1.0]}}}
    assert wrap_from_hydra(cfg, enc) is enc
    assert enc.diff3r.adapter.name == "noposplat" and enc.diff3r.config.steps == 3
    assert enc.diff3r.adapter.background.tolist() == [1.0, 1.0, 1.0]


def test_wrap_from_hydra_explicit_and_unknown_names():
    enc = uf.build("mvsplat")
    wrap_from_hydra({"diff3r": dict(CHEAP, adapter="pixelsplat")}, enc)
    assert enc.diff3r.adapter.name == "pixelsplat"
    with pytest.raises(UnknownAdapterError) as info:
        wrap_from_hydra({"diff3r": dict(CHEAP, adapter="foosplat")}, uf.build("mvsplat"))
    assert "mvsplat" in str(info.value) and "noposplat" in str(info.value)


def test_wrap_from_hydra_without_node_or_disabled_leaves_encoder():
    enc = uf.build("mvsplat")
    assert wrap_from_hydra({"optimizer": {"lr": 1e-4}}, enc) is enc and not hasattr(enc, "diff3r")
    wrap_from_hydra({"diff3r": dict(CHEAP, enabled=False)}, enc)
    assert not hasattr(enc, "diff3r")


def test_compose_with_plus_optimizer_keeps_training_optimizer(tmp_path: Path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.yaml").write_text(
        "defaults:\n  - _self_\noptimizer:\n  lr: 1.0e-4\n  warm_up_steps: 10\n")
    cfg = compose_upstream_config(tmp_path, ["+optimizer=diff3r", "diff3r.steps=1",
                                             "diff3r.inner_solver=adam", "diff3r.lambda_mode=constant"])
    assert cfg.optimizer.lr == 1e-4 and "name" not in cfg.optimizer
    enc = wrap_from_hydra(cfg, uf.build("mvsplat"))
    assert enc.diff3r.config.steps == 1
    with pytest.raises(FileNotFoundError):
        compose_upstream_config(tmp_path / "nope", [])


def test_torch_decoder_matches_upstream_signature():
    enc = uf.build("mvsplat")
    ctx = uf.make_context(h=8, w=8)
    with torch.no_grad():
        g = enc(ctx, 0)
    dec = TorchDecoder(background_color=(0.0, 0.0, 0.0), sh_basis="e3nn")
    out = dec.forward(g, ctx["extrinsics"], ctx["intrinsics"], ctx["near"], ctx["far"], (8, 8))
    assert isinstance(out, DecoderOutput) and out.color.shape == (1, 2, 3, 8, 8) and out.depth is None
    out_d = dec(g, ctx["extrinsics"], ctx["intrinsics"], ctx["near"], ctx["far"], (8, 8), depth_mode="depth")
    assert out_d.depth.shape == (1, 2, 8, 8)
    torch.testing.assert_close(out_d.color, out.color)
    zeros = torch.zeros(1, 2, 3)
    out_p = dec(g, ctx["extrinsics"], ctx["intrinsics"], ctx["near"], ctx["far"], (8, 8),
                cam_rot_delta=zeros, cam_trans_delta=zeros)  # NoPoSplat kwargs
    torch.testing.assert_close(out_p.color, out.color, atol=1e-5, rtol=0)
    assert float(out.color.max()) > 0  # the Gaussians are in front of the cameras


def test_import_stubs(monkeypatch):
    monkeypatch.delitem(sys.modules, "diff3r_fake_cuda_ext", raising=False)
    monkeypatch.delitem(sys.modules, "diff3r_fake_video", raising=False)
    monkeypatch.delitem(sys.modules, "diff3r_fake_video.editor", raising=False)
    stubbed = install_import_stubs(["diff3r_fake_video", "diff3r_fake_video.editor"])
    assert stubbed == ["diff3r_fake_video", "diff3r_fake_video.editor"]
    import diff3r_fake_video.editor as ed  # noqa: F401  (import works)
    with pytest.raises(RuntimeError, match="stub"):
        ed.VideoFileClip
    assert install_import_stubs(["torch"]) == []  # real modules are left alone
    from diff3r_plugin.integration.upstream import install_rasterizer_stub

    mod = install_rasterizer_stub("diff3r_fake_cuda_ext")
    mod.GaussianRasterizationSettings(image_height=1)
    with pytest.raises(RuntimeError, match="TorchDecoder"):
        mod.GaussianRasterizer()
    monkeypatch.delitem(sys.modules, "diff3r_fake_cuda_ext")
