"""wrap_from_hydra, TorchDecoder, import stubs, Hydra composition and NoPoSplat point-depth init."""

import sys
from pathlib import Path

import pytest
import torch

import upstream_fixtures as uf
from diff3r_plugin.errors import UnknownAdapterError
from diff3r_plugin.integration.compose import compose_upstream_config
from diff3r_plugin.integration.cpu_run import DecoderOutput, TorchDecoder, install_import_stubs
from diff3r_plugin.integration.hydra_callback import wrap_from_hydra

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
    from diff3r_plugin.integration.cpu_run import install_rasterizer_stub

    mod = install_rasterizer_stub("diff3r_fake_cuda_ext")
    mod.GaussianRasterizationSettings(image_height=1)
    with pytest.raises(RuntimeError, match="TorchDecoder"):
        mod.GaussianRasterizer()
    monkeypatch.delitem(sys.modules, "diff3r_fake_cuda_ext")


def test_init_point_depth_moves_untrained_points_ahead_and_keeps_keys():
    """NoPoSplat-shaped point heads: the bias gives ``u * expm1(|o|) = (0, 0, depth)``."""
    import math

    from torch import nn

    from diff3r_plugin.adapters.noposplat import init_point_depth

    class Dpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.dpt = Dpt()

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.downstream_head1, self.downstream_head2 = Head(), Head()

    enc = Enc()
    keys = list(enc.state_dict())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    changed = init_point_depth(enc, 2.5)
    assert changed == ["downstream_head1.dpt.head.2.bias[:3]", "downstream_head2.dpt.head.2.bias[:3]"]
    assert list(enc.state_dict()) == keys
    for h in (enc.downstream_head1, enc.downstream_head2):
        last = h.dpt.head[-1]
        torch.nn.init.zeros_(last.weight)
        o = h.dpt.head(torch.randn(1, 4, 5, 5))[:, :3].permute(0, 2, 3, 1)
        d = o.norm(dim=-1, keepdim=True)
        pts = o / d * torch.expm1(d)
        assert torch.allclose(pts[..., 2], torch.full_like(pts[..., 2], 2.5), atol=1e-5)
        assert pts[..., :2].abs().max() < 1e-6
        assert math.isclose(float(last.bias[2]), math.log1p(2.5), rel_tol=1e-6)
    # Only the three point channels' biases changed (the weights were zeroed above by the test).
    assert torch.equal(enc.state_dict()["downstream_head1.dpt.head.0.weight"], before["downstream_head1.dpt.head.0.weight"])
    assert torch.equal(enc.state_dict()["downstream_head1.dpt.head.2.bias"][3:], before["downstream_head1.dpt.head.2.bias"][3:])

    with pytest.raises(ValueError, match="must be > 0"):
        init_point_depth(enc, 0.0)
    with pytest.raises(ValueError, match="no NoPoSplat point head 'downstream_head1'"):
        init_point_depth(nn.Linear(2, 2), 1.0)
