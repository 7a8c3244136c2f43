"""The examples' built-in main job (tiny encoders on embedded scenes, trained with and without
Diff3R, then compared) and their command lines."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diff3r_plugin.demo import DEMO_METHODS, OUTPUT_FILES, main as demo_main
from diff3r_plugin.integration.examples import run_upstream_example

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small enough for CI: 3 outer steps (the last through the layer), 1 scene each way.
TINY = ["--steps", "3", "--train-scenes", "1", "--eval-scenes", "1", "--tto-steps", "1",
        "--steps-list", "0,1", "--image-size", "16", "--quiet"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("kind", ["pose_free", "pose_given"])
def test_builtin_main_job_trains_both_models_and_writes_its_pictures(kind, tmp_path, capsys):
    out = tmp_path / "out"
    assert demo_main(kind, "example", [*TINY, "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model"] == kind
    # Both models trained for the same number of outer steps; the last one differs.
    assert res["outer_steps"] == {"baseline": 3, "diff3r": 3, "shared_pretrain": 2}
    assert res["training_pcg"]["steps"] == 1
    assert list(res["eval"]) == list(DEMO_METHODS)
    for method, row in res["eval"].items():
        assert math.isfinite(row["psnr"]) and 5 < row["psnr"] < 60, (method, row)
        assert 0 < row["ssim"] <= 1
        assert row["tto_steps"] == (0 if method == "zero_shot" else 1)
        assert row["lpips"] is None or math.isfinite(row["lpips"])
    if res["eval"]["zero_shot"]["lpips"] is None:
        assert "LPIPS" in res["lpips_note"]
    # TTO changes the render: the curve's two points differ for both TTO methods.
    for method in ("zero_shot_tto", "diff3r_tto"):
        curve = res["psnr_vs_steps"][method]
        assert set(curve) == {"0", "1"} and curve["0"] != curve["1"]
    # zero_shot and zero_shot_tto at 0 steps are the same model and the same render.
    assert res["psnr_vs_steps"]["zero_shot_tto"]["0"] == pytest.approx(res["eval"]["zero_shot"]["psnr"])
    lam = res["lambda_predicted"]
    assert {"means", "opacity_logits", "sh_dc"} <= set(lam) and all(v > 0 for v in lam.values())
    assert ("pose" in lam) == (kind == "pose_free")
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES.values())
    for name in ("grid", "psnr_vs_steps", "lambda_map"):
        w, h = _png_size(Path(res["files"][name]))
        assert w > 100 and h > 100
    assert json.loads((out / "demo.json").read_text())["eval"] == res["eval"]


def test_second_run_overwrites_its_own_files_only(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "grid.png").write_bytes(b"stale")
    assert demo_main("pose_given", "example", [*TINY, "--json", "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert demo_main("pose_given", "example", [*TINY, "--json", "--out", str(out)]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "grid.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), "notes.txt"])
    assert second["eval"] == first["eval"]  # same seed, same figures


@pytest.mark.parametrize("argv, needle", [
    (["--no-such-option"], "--no-such-option"),
    (["--steps", "many"], "--steps"),
    (["--steps-list", "1,x"], "--steps-list"),
    (["--steps", "0"], ">= 1"),
    (["--threads", "0"], "--threads"),
])
def test_bad_options_are_one_line_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        demo_main("pose_free", "example", argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and needle in err


def test_unwritable_output_directory_is_a_one_line_usage_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        demo_main("pose_free", "example", ["--out", str(blocker / "sub")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write to output directory" in err
    assert str(blocker / "sub") in err


def test_example_script_dispatches_bad_option_to_the_builtin_parser():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "wrap_noposplat.py"), "--bogus"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrap_noposplat.py: error:" in lines[0] and "--bogus" in lines[0]


def test_repo_without_upstream_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run_upstream_example("mvsplat", ["--repo", "depthsplat"])
    assert exc.value.code == 2
    assert "--upstream" in capsys.readouterr().err


def test_unknown_repo_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run_upstream_example("mvsplat", ["--repo", "anysplat", "--upstream", "/nowhere"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "anysplat" in err and "depthsplat" in err
