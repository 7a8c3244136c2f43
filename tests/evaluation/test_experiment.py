import json
import math
from pathlib import Path

from diff3r_plugin.evaluation.experiment import default_data_dir, run_experiment


def _finite(x):
    return x is None or (isinstance(x, float) and math.isfinite(x))


def test_quick_experiment_end_to_end(tmp_path):
    res = run_experiment(quick=True, image_size=32, out=str(tmp_path), progress=False,
                         data="default")
    assert set(["real", "embedded", "psnr_vs_steps", "train_minutes"]) <= set(res)
    methods = {"zero_shot", "zero_shot_tto", "diff3r_tto", "diff3r_no_lambda"}
    assert set(res["embedded"]) == methods
    if default_data_dir() is not None:
        assert set(res["real"]) == methods
    for split in ("real", "embedded"):
        for m, d in res[split].items():
            assert set(d) == {"psnr", "ssim", "lpips"}
            assert math.isfinite(d["psnr"]) and math.isfinite(d["ssim"]) and _finite(d["lpips"])
    for curve in res["psnr_vs_steps"]["embedded"].values():
        assert all(math.isfinite(v) for v in curve.values())
    assert math.isfinite(res["train_minutes"])
    for f in res["files"]:
        assert Path(f).is_file() and Path(f).stat().st_size > 0 and f.endswith(".png")
    saved = json.loads((tmp_path / "experiment.json").read_text())
    assert saved["embedded"].keys() == res["embedded"].keys()
    assert (tmp_path / "baseline.pt").is_file() and (tmp_path / "diff3r.pt").is_file()

    # The saved checkpoints drive `diff3r eval` (embedded held-out scenes, one scene).
    from diff3r_plugin.cli import main
    out = tmp_path / "eval"
    assert main(["eval", "--baseline", str(tmp_path / "baseline.pt"), "--diff3r",
                 str(tmp_path / "diff3r.pt"), "--scenes", "1", "--steps", "1",
                 "--steps-list", "0,1", "--out", str(out), "--json"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert {"zero_shot", "zero_shot_tto", "diff3r_tto", "diff3r_no_lambda"} <= set(ev)
    assert math.isfinite(ev["diff3r_tto"]["psnr"])
    assert (out / "grid.png").is_file() and (out / "psnr_vs_steps.png").is_file()
