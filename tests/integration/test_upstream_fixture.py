"""The whole Hydra-callback path on an upstream-shaped repository (tests/fixtures/upstream_repo).

Every run is the fixture's own ``python -m src.main`` (through ``diff3r cpu-run``: the fixture,
like upstream, imports the CUDA rasterizer and hard-codes ``Trainer(accelerator="gpu")``) in a
subprocess, with 12x12 images and two training steps. Nothing in the fixture knows the plugin:
``+optimizer=diff3r`` is the only difference between a plain and a Diff3R run.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

pytest.importorskip("pytorch_lightning")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upstream_repo"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: A cheap inner solve: the point here is the wiring, not the layer.
CHEAP = ["diff3r.steps=2", "diff3r.inner_solver=adam", "diff3r.pcg_maxiter=10"]
LOSS_LINE = re.compile(r"train step (\d+); rank (\d+); loss = (\S+)")


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, out: Path) -> None:
        self.proc, self.out = proc, out
        self.text = proc.stdout + proc.stderr

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0

    def report(self, rank: int = 0) -> Dict:
        name = "diff3r_report.json" if rank == 0 else f"diff3r_report.rank{rank}.json"
        return json.loads((self.out / name).read_text())

    def losses(self, rank: int = 0) -> List[float]:
        return [float(m.group(3)) for m in LOSS_LINE.finditer(self.proc.stdout) if int(m.group(2)) == rank]

    def checkpoint(self) -> Path:
        ckpts = sorted((self.out / "checkpoints").glob("*.ckpt"))
        assert ckpts, f"no checkpoint in {self.out}: {self.text[-3000:]}"
        return ckpts[-1]


def run_fixture(out: Path, *overrides: str, timeout: int = 600) -> Run:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "diff3r_plugin.cli", "cpu-run", "-m", "src.main", *overrides,
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=str(FIXTURE), capture_output=True, text=True, env=env, timeout=timeout)
    return Run(proc, out)


def _load(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """Two training steps through Diff3R, a checkpoint at step 2 and one validation step."""
    run = run_fixture(tmp_path_factory.mktemp("diff3r") / "run", "+optimizer=diff3r", *CHEAP)
    assert run.ok, run.text[-4000:]
    return run


def test_plus_optimizer_wraps_trains_and_reports(trained: Run) -> None:
    report = trained.report()
    assert report["wrapped"] is True and report["adapter"] == "mvsplat"  # auto-detected
    assert report["state_dict_keys_unchanged"] is True
    assert report["head_parameters"] > 0 and report["head_in_optimizer"] is True
    # The fixture splits parameters like NoPoSplat: its new heads at lr, the backbone at lr * 0.1.
    # The uncertainty head is a new parameter: it goes with the new heads.
    assert report["head_lr"] == pytest.approx(1e-3)
    assert report["train_steps"] == 2 and len(report["losses"]) == 2 and report["losses_finite"]
    # The report's losses are the ones upstream's training_step printed.
    assert report["losses"] == pytest.approx(trained.losses(), rel=1e-6, abs=0)
    assert len(report["stationarity"]) == 2 and all(0 <= s < 10 for s in report["stationarity"])
    assert len(report["pcg_rel_residual"]) == 2 and all(r is not None and r >= 0 for r in report["pcg_rel_residual"])
    assert report["loaded_checkpoint_had_head"] is None
    # The head was trained (its values changed) and the validation step ran the TTO too.
    assert report["head_digest"] != report["head_digest_initial"]
    assert report["tto_calls"] == 3
    assert re.search(r"val step 0; inference_mode = \w+; psnr = [0-9.]+", trained.proc.stdout), trained.proc.stdout


def test_checkpoint_holds_head_and_upstream_keys(trained: Run) -> None:
    ckpt = _load(trained.checkpoint())
    state = ckpt["state_dict"]
    head = {k for k in state if k.startswith("diff3r_head.")}
    assert head, sorted(state)
    assert {k for k in state if not k.startswith("diff3r_head.")} == {
        "encoder.backbone.0.weight", "encoder.backbone.0.bias",
        "encoder.gaussian_param_head.weight", "encoder.gaussian_param_head.bias"}
    assert ckpt["diff3r"]["wrapped"] is True  # the report travels with the checkpoint
    assert (trained.out / "diff3r_report.json").is_file()


def test_reload_with_head_and_headless_checkpoint(trained: Run, tmp_path: Path) -> None:
    ckpt_path = trained.checkpoint()
    # Upstream's strict load_from_checkpoint path (checkpointing.load, resume=false).
    again = run_fixture(tmp_path / "with_head", "+optimizer=diff3r", *CHEAP, f"checkpointing.load='{ckpt_path}'",
                        "trainer.max_steps=1")
    assert again.ok, again.text[-4000:]
    assert again.report()["loaded_checkpoint_had_head"] is True
    assert "checkpoint holds the uncertainty head" in again.text

    # A released upstream checkpoint has no head keys: strict loading still works, fresh head.
    ckpt = _load(ckpt_path)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("diff3r_head.")}
    headless = tmp_path / "headless.ckpt"
    torch.save(ckpt, headless)
    fresh = run_fixture(tmp_path / "headless", "+optimizer=diff3r", *CHEAP, f"checkpointing.load='{headless}'",
                        "trainer.max_steps=1")
    assert fresh.ok, fresh.text[-4000:]
    report = fresh.report()
    assert report["loaded_checkpoint_had_head"] is False and report["wrapped"] is True
    assert "no uncertainty-head keys" in fresh.text
    # The file the user passed was not changed by loading it.
    assert not any(k.startswith("diff3r_head.") for k in _load(headless)["state_dict"])


def test_disabled_is_exactly_upstream(tmp_path: Path) -> None:
    plain = run_fixture(tmp_path / "plain")
    off = run_fixture(tmp_path / "off", "+optimizer=diff3r", "diff3r.enabled=false")
    assert plain.ok, plain.text[-4000:]
    assert off.ok, off.text[-4000:]
    assert not (plain.out / "diff3r_report.json").exists()
    assert len(plain.losses()) == 2
    assert off.losses() == plain.losses()  # the same loss at every step, bit for bit
    report = off.report()
    assert report["wrapped"] is False and report["head_parameters"] == 0
    assert report["losses"] == plain.losses()
    state = _load(off.checkpoint())["state_dict"]
    assert not any(k.startswith("diff3r_head.") for k in state)


@pytest.mark.slow
def test_ddp_two_ranks_keep_identical_heads(tmp_path: Path) -> None:
    run = run_fixture(tmp_path / "ddp", "+optimizer=diff3r", *CHEAP, "trainer.devices=2", "trainer.strategy=ddp",
                      "trainer.limit_val_batches=0", timeout=900)
    assert run.ok, run.text[-4000:]
    r0, r1 = run.report(0), run.report(1)
    assert r0["rank"] == 0 and r1["rank"] == 1
    assert r0["train_steps"] == r1["train_steps"] == 2
    # The ranks saw different scenes (different losses), yet their heads stayed identical...
    assert r0["losses"] != r1["losses"]
    assert r0["head_digest"] == r1["head_digest"]
    # ...and they were trained, not merely left at a common initialization.
    assert r0["head_digest"] != r0["head_digest_initial"]


@pytest.mark.parametrize("overrides, expected", [
    (["diff3r.adapter=foosplat"], r"Unknown adapter 'foosplat'.*Known adapters: .*mvsplat"),
    (["model/encoder=mystery"], r"Could not detect a diff3r adapter for encoder class 'EncoderMystery'"),
    (["hydra.callbacks.diff3r.model_wrapper=src.model.nowhere.ModelWrapper"],
     r"cannot import 'src\.model\.nowhere'.*ModelWrapper"),
    (["diff3r.point_depth_init=2.0", "checkpointing.load=/nowhere.ckpt"], r"refused together with a checkpoint"),
    (["+diff3r.stpes=3"], r"Did you mean 'diff3r\.steps'"),
])
def test_bad_input_fails_at_job_start(tmp_path: Path, overrides: List[str], expected: str) -> None:
    run = run_fixture(tmp_path / "bad", "+optimizer=diff3r", *CHEAP, *overrides)
    assert not run.ok
    assert re.search(expected, run.text, re.S), run.text[-3000:]
    assert "train step" not in run.proc.stdout  # never a silently unwrapped run
