"""``diff3r cpu-run``: module lookup, the torch decoder registered as upstream's Decoder, the CLI."""

import sys
import types
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from diff3r_plugin.cli import main as cli_main
from diff3r_plugin.errors import IntegrationError
from diff3r_plugin.integration.cpu_run import cpu_run, patch_decoders, torch_decoder_class


def test_missing_module_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["cpu-run", "-m", "src.no_such_main"]) == 2
    err = capsys.readouterr().err
    assert "no module named 'src.no_such_main'" in err and "upstream repository root" in err
    with pytest.raises(IntegrationError, match="not a module name"):
        cpu_run("src/main.py")
    assert cli_main(["cpu-run", "src.main"]) == 2  # -m is required
    assert "usage: diff3r cpu-run [--trainer KEY=VALUE ...] -m MODULE" in capsys.readouterr().err
    assert cli_main(["cpu-run", "--trainer", "oops", "-m", "src.main"]) == 2
    assert "--trainer needs KEY=VALUE, got 'oops'" in capsys.readouterr().err


def test_runs_a_module_with_its_arguments(tmp_path, monkeypatch, capsys):
    (tmp_path / "cpu_run_probe_mod.py").write_text(
        "import sys\nimport diff_gaussian_rasterization as d\n"
        "print('ARGS', sys.argv[1:], getattr(d, '__diff3r_stub__', False))\n"
        "raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = list(sys.argv)
    assert cpu_run("cpu_run_probe_mod", ["a=1", "--flag"]) == 3  # the module's exit status
    out = capsys.readouterr().out
    assert "'a=1', '--flag'" in out and out.strip().endswith("True")  # stubbed CUDA import
    assert sys.argv == argv  # restored


@dataclass
class _Out:
    color: Tensor
    depth: Optional[Tensor]


class _Decoder(nn.Module):
    """Shaped like upstream's ``Decoder`` base (``__init__(cfg, dataset_cfg)``)."""

    def __init__(self, cfg, dataset_cfg=None) -> None:
        super().__init__()
        self.cfg, self.dataset_cfg = cfg, dataset_cfg


class _CudaDecoder(_Decoder):
    def forward(self, gaussians, extrinsics, intrinsics, near, far, image_shape, depth_mode=None):
        raise RuntimeError("CUDA only")


class _PoseCudaDecoder(_Decoder):
    def forward(self, gaussians, extrinsics, intrinsics, near, far, image_shape, depth_mode=None,
                cam_rot_delta=None, cam_trans_delta=None):
        raise RuntimeError("CUDA only")


def test_torch_decoder_is_a_genuine_subclass_and_renders(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "adapters"))
    import upstream_fixtures as uf

    pkg = types.ModuleType("cpufake.model.decoder")
    pkg.Decoder, pkg.DecoderOutput = _Decoder, _Out
    pkg.DECODERS = {"splatting_cuda": _CudaDecoder, "pose": _PoseCudaDecoder}
    monkeypatch.setitem(sys.modules, "cpufake.model.decoder", pkg)
    monkeypatch.setattr(_Decoder, "__module__", "cpufake.model.decoder")
    assert patch_decoders("cpufake") == ["splatting_cuda", "pose"]
    assert patch_decoders("cpufake") == []  # idempotent
    cls = pkg.DECODERS["splatting_cuda"]
    assert issubclass(cls, _Decoder) and not issubclass(cls, _CudaDecoder)
    dec = cls(types.SimpleNamespace(name="splatting_cuda"), types.SimpleNamespace(background_color=[0.0, 0.0, 0.0]))
    assert isinstance(dec, _Decoder) and dec.torch_decoder.sh_basis == "e3nn"
    assert list(dec.state_dict()) == []  # checkpoints unchanged
    enc = uf.build("mvsplat")
    ctx = uf.make_context(h=8, w=8)
    with torch.no_grad():
        g = enc(ctx, 0)
    out = dec(g, ctx["extrinsics"], ctx["intrinsics"], ctx["near"], ctx["far"], (8, 8))
    assert type(out) is _Out and out.color.shape == (1, 2, 3, 8, 8) and out.depth is None
    assert float(out.color.max()) > 0
    pose = pkg.DECODERS["pose"](types.SimpleNamespace(background_color=[1.0, 1.0, 1.0], make_scale_invariant=True))
    assert pose.torch_decoder.sh_basis == "3dgs" and pose.make_scale_invariant is True
    out = pose(g, ctx["extrinsics"], ctx["intrinsics"], ctx["near"], ctx["far"], (8, 8))
    assert out.depth is not None and out.depth.shape == (1, 2, 8, 8)  # NoPoSplat: depth always
    assert torch_decoder_class(_CudaDecoder, _Decoder).__name__ == "Torch_CudaDecoder"


def test_upstream_example_command(tmp_path, capsys):
    from diff3r_plugin.integration.examples import example_overrides, run_upstream_example, upstream_command

    ov = example_overrides("noposplat", tmp_path, 64, 2, ["steps=1"], ["hydra.run.dir=/x"])
    assert ov[0] == "+experiment=re10k" and ov[-2:] == ["+optimizer=diff3r", "diff3r.steps=1"]
    assert f"dataset.re10k.roots=[{tmp_path}]" in ov and "trainer.max_steps=2" in ov
    assert f"dataset.re10k.view_sampler.index_path={tmp_path / 'evaluation_index_2ctx.json'}" in ov
    assert upstream_command(ov, "cpu")[1:8] == ["-m", "diff3r_plugin.cli", "cpu-run", "--trainer",
                                                 "num_sanity_val_steps=0", "-m", "src.main"]
    assert upstream_command(ov, "cuda")[1:3] == ["-m", "src.main"]  # on CUDA only the config line changes
    with pytest.raises(ValueError, match="unknown upstream repository 'anysplat'"):
        example_overrides("anysplat", tmp_path, 64, 2)
    assert run_upstream_example("mvsplat", ["--upstream", str(tmp_path), "--eval-scenes", "1"]) == 2
    assert "not an upstream checkout" in capsys.readouterr().err


def test_trainer_becomes_cpu_and_takes_extra_arguments():
    pl = pytest.importorskip("pytorch_lightning")
    from diff3r_plugin.integration.cpu_run import _CPUTrainerPatch

    init = pl.Trainer.__init__
    with _CPUTrainerPatch("no_such_package", None, {"num_sanity_val_steps": 0}):
        trainer = pl.Trainer(accelerator="gpu", num_sanity_val_steps=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert trainer.num_sanity_val_steps == 0
    assert pl.Trainer.__init__ is init  # undone
