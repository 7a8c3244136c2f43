import json
import math
from pathlib import Path

import pytest
import torch

from diff3r_plugin.evaluation.experiment import default_data_dir, run_experiment

METHODS = {"zero_shot", "zero_shot_tto", "diff3r_tto", "diff3r_no_lambda"}
PROTOCOL = METHODS | {"zero_shot_tto_naive", "diff3r_unroll"}


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


def _check_table(table, methods, seeds):
    assert methods <= set(table)
    for m in methods:
        d = table[m]
        assert _finite(d["psnr"]) and _finite(d["ssim"]) and (d["lpips"] is None or _finite(d["lpips"]))
        assert len(d["psnr_per_seed"]) == seeds
        assert d["psnr"] == pytest.approx(sum(d["psnr_per_seed"]) / seeds)
    paired = table["paired"]["diff3r_tto_minus_zero_shot_tto"]
    low, high = paired["ci95"]
    assert low <= paired["mean"] <= high and len(paired["per_seed"]) == seeds
    # The paired mean is the difference of the two methods' means (same views, same seeds).
    diff = table["diff3r_tto"]["psnr"] - table["zero_shot_tto"]["psnr"]
    assert paired["mean"] == pytest.approx(diff, abs=1e-6)


def test_quick_experiment_end_to_end(tmp_path):
    res = run_experiment(quick=True, out=str(tmp_path), progress=False, data="default")
    seeds = len(res["training"]["seeds"])
    assert seeds >= 2
    assert {"real", "embedded", "psnr_vs_steps", "train_minutes", "total_minutes", "pose_free",
            "lambda_overlap_ratio", "training"} <= set(res)
    _check_table(res["embedded"], PROTOCOL, seeds)
    if default_data_dir() is not None:
        _check_table(res["real"], PROTOCOL, seeds)
        _check_table(res["pose_free"], METHODS | {"zero_shot_tto_naive"}, 1)
        assert "real" in res["lambda_overlap_ratio"]
        assert res["real_note"].startswith("2 context windows")
    for split in ("real", "embedded"):
        for m, curve in res["psnr_vs_steps"][split].items():
            assert set(curve) == {"0", "1", "2"} and all(_finite(v) for v in curve.values())
            assert str(res["peak_step"][split][m]) in curve
    tr = res["training"]
    for key in ("seconds_per_step", "peak_memory_mb"):
        assert set(tr[key]) == {"baseline", "diff3r", "diff3r_unroll"}
    assert all(v > 0 for v in tr["seconds_per_step"].values())
    assert tr["grad_cosine"]["samples"] > 0
    for key in ("theta0", "lambda"):
        assert -1.0 <= tr["grad_cosine"][key] <= 1.0
    assert tr["saved_for_backward_mb"]["diff3r_unroll"] > tr["saved_for_backward_mb"]["baseline"]
    assert tr["baseline_tto_lambda"] in {v["lambda"] for v in tr["lambda_variants"]}
    assert tr["validation_curve"]["best_step"] in tr["validation_curve"]["step"]
    assert _finite(res["total_minutes"]) and res["total_minutes"] > 0
    names = {Path(f).name for f in res["files"]}
    assert {"training_curve.png", "grid_embedded.png", "psnr_vs_steps_embedded.png",
            "lambda_map_embedded.png"} <= names
    if default_data_dir() is not None:
        assert "lambda_map_real.png" in names
    for f in res["files"]:
        assert Path(f).is_file() and Path(f).stat().st_size > 0 and f.endswith(".png")
    saved = json.loads((tmp_path / "experiment.json").read_text())
    assert saved["embedded"].keys() == res["embedded"].keys()
    for k in range(seeds):
        assert (tmp_path / f"seed{k}" / "baseline.pt").is_file()
        assert (tmp_path / f"seed{k}" / "diff3r.pt").is_file()

    # The saved checkpoints drive `diff3r eval` with every context window and the interval.
    from diff3r_plugin.cli import main
    out = tmp_path / "eval"
    args = ["eval", "--baseline", str(tmp_path / "seed0" / "baseline.pt"), "--diff3r",
            str(tmp_path / "seed0" / "diff3r.pt"), "--scenes", "1", "--steps", "1",
            "--steps-list", "0,1", "--out", str(out), "--json"]
    if default_data_dir() is not None:
        args += ["--data", str(default_data_dir()), "--max-windows", "2"]
    assert main(args) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert METHODS <= set(ev)
    assert _finite(ev["diff3r_tto"]["psnr"])
    assert "diff3r_tto_minus_zero_shot_tto" in ev["paired"]
    assert (out / "grid.png").is_file() and (out / "psnr_vs_steps.png").is_file()


def test_gradient_cosine_matches_direct_unrolled_computation():
    """The logged cosines are cos(implicit, unrolled) of the same K-step map, with both
    gradients computed here directly by autograd through the layer."""
    import torch.nn.functional as F

    from diff3r_plugin.data.embedded import EmbeddedDataset
    from diff3r_plugin.gaussians.layout import GaussianParams
    from diff3r_plugin.layer import diff3r_layer
    from diff3r_plugin.models import TinyPoseGivenEncoder
    from diff3r_plugin.training import forward_model, gradient_cosine, tto_config
    from diff3r_plugin.render.api import render_params
    from diff3r_plugin.uncertainty import UncertaintyHead

    torch.manual_seed(0)
    batch = EmbeddedDataset(1, image_shape=(12, 12), num_views=4)[0]
    enc = TinyPoseGivenEncoder(width=8, num_depths=4).eval()
    head = UncertaintyHead(enc.num_features, enc.sh_degree, 0, init=0.5)
    cfg = tto_config(3, pcg_maxiter=20, precond_probes=1)

    cos = gradient_cosine(enc, head, batch, config=cfg)
    with torch.no_grad():
        base = forward_model(enc, head, batch, tto=False, config=cfg)
    layout = base.theta0.layout
    tgt = batch["target"]
    grads = {}
    for backward in ("implicit", "unroll"):
        t0 = base.theta0.flatten().clone().requires_grad_(True)
        lam = base.lam.clone().requires_grad_(True)
        theta, _ = diff3r_layer(t0, lam, base.views, layout, cfg.merge({"backward": backward}))
        color = render_params(GaussianParams.unflatten(theta, layout), tgt["extrinsics"],
                              tgt["intrinsics"], tgt["near"], tgt["far"], (12, 12),
                              apply_pose=False, sh_basis=base.views.sh_basis).color
        grads[backward] = torch.autograd.grad(F.mse_loss(color, tgt["image"]), (t0, lam))
    for i, key in enumerate(("theta0", "lambda")):
        a, b = grads["implicit"][i].flatten(), grads["unroll"][i].flatten()
        assert float(b.norm()) > 0
        direct = float(a @ b / (a.norm() * b.norm()))
        assert cos[key] == pytest.approx(direct, abs=1e-5)
        assert -1.0 <= cos[key] <= 1.0
    # A 3-step map is far from stationary: the two gradients differ, so the cosine says so.
    assert cos["theta0"] < 0.9999
    assert cos["stationarity"] is not None and cos["stationarity"] > 0


def test_every_context_window_of_the_real_scenes():
    from diff3r_plugin.data.chunks import ChunkDataset
    from diff3r_plugin.evaluation.eval_cli import load_real_windows

    root = default_data_dir()
    if root is None:
        pytest.skip("../shared/data/re10k_demo is not present")
    windows = load_real_windows(root, image_size=16)
    ds = ChunkDataset(root, "test")
    counts = {}
    for ex in windows:
        counts[ex["scene"]] = counts.get(ex["scene"], 0) + 1
        i = ex["window"]
        assert ex["context"]["index"][0].tolist() == [i, i + 3]
        assert ex["target"]["index"][0].tolist() == [i + 1, i + 2]
        assert ex["context"]["image"].shape == (1, 2, 3, 16, 16)
    assert counts == {key: ds[key].num_views - 3 for key in counts}
    assert len(counts) == 3 and len(windows) == sum(counts.values())
    strided = load_real_windows(root, image_size=16, stride=3)
    assert [(e["scene"], e["window"]) for e in strided] == \
        [(e["scene"], e["window"]) for e in windows if e["window"] % 3 == 0]


def _tiny_models_and_examples():
    """An untrained tiny encoder as both models (the head at Lambda 0.5) and two scenes."""
    from diff3r_plugin.data.embedded import EmbeddedDataset
    from diff3r_plugin.models import TinyPoseGivenEncoder
    from diff3r_plugin.uncertainty import UncertaintyHead

    torch.manual_seed(0)
    ds = EmbeddedDataset.held_out(2, image_shape=(12, 12), num_views=4)
    enc = TinyPoseGivenEncoder(width=8, num_depths=4).eval()
    head = UncertaintyHead(enc.num_features, enc.sh_degree, 0, init=0.5).eval()
    return {"baseline": (enc, None), "diff3r": (enc, head)}, [ds[0], ds[1]]


def test_batched_evaluation_equals_one_example_at_a_time():
    """Scenes solved in one layer call keep their own TTO: the same metrics as one by one."""
    from diff3r_plugin.evaluation.eval_cli import evaluate
    from diff3r_plugin.training import tto_config

    models, examples = _tiny_models_and_examples()
    cfg = tto_config(2, pcg_maxiter=3)
    kw = dict(methods=("zero_shot_tto", "zero_shot_tto_naive", "diff3r_tto"), steps_list=[0, 1, 2],
              lambda_overlap=True)
    one = evaluate(models, examples, cfg, batch_size=1, **kw)
    two = evaluate(models, examples, cfg, batch_size=2, **kw)
    for m in kw["methods"]:
        assert len(two["metrics"][m]["per_view_psnr"]) == 2 * len(examples)
        assert two["metrics"][m]["per_view_psnr"] == pytest.approx(
            one["metrics"][m]["per_view_psnr"], abs=2e-3)
        assert two["psnr_vs_steps"][m] == pytest.approx(one["psnr_vs_steps"][m], abs=2e-3)
    # Naive TTO uses the near-zero Lambda, so it differs from the constant-Lambda TTO.
    assert one["lambda_mean"]["zero_shot_tto_naive"] == pytest.approx(1e-4)
    assert one["metrics"]["zero_shot_tto_naive"]["per_view_psnr"] != \
        one["metrics"]["zero_shot_tto"]["per_view_psnr"]
    assert len(one["lambda_overlap"]["diff3r"]["per_example"]) == len(examples)


def test_tto_curve_from_one_solve_equals_separate_solves():
    """The PSNR-vs-steps points read off one long Adam solve are those of shorter solves."""
    from diff3r_plugin.evaluation.eval_cli import evaluate
    from diff3r_plugin.training import tto_config

    models, examples = _tiny_models_and_examples()
    methods = ("zero_shot_tto", "diff3r_tto")
    long = evaluate(models, examples, tto_config(5, pcg_maxiter=3), methods=methods,
                    steps_list=[0, 2, 5], batch_size=2)
    for s in (2, 5):
        short = evaluate(models, examples, tto_config(s, pcg_maxiter=3), methods=methods,
                         steps_list=[0, s], batch_size=2)
        for m in methods:
            assert long["psnr_vs_steps"][m][str(s)] == pytest.approx(short["metrics"][m]["psnr"],
                                                                     abs=1e-4)
    # The points differ from each other: the curve is not one value repeated.
    curve = long["psnr_vs_steps"]["zero_shot_tto"]
    assert curve["2"] != curve["5"] and curve["0"] != curve["2"]


def test_recorded_iterates_are_those_of_shorter_solves():
    from diff3r_plugin.data.embedded import EmbeddedDataset
    from diff3r_plugin.layer.inner import record_iterates
    from diff3r_plugin.models import TinyPoseGivenEncoder
    from diff3r_plugin.training import forward_model, prepare_batch, tto_config

    torch.manual_seed(0)
    enc = TinyPoseGivenEncoder(width=8, num_depths=4).eval()
    batch = prepare_batch(enc, EmbeddedDataset.held_out(1, image_shape=(12, 12), num_views=4)[0])
    with torch.no_grad(), record_iterates([0, 1, 3, 9]) as store:
        pred = forward_model(enc, None, batch, tto=True, lambda_mode="constant",
                             config=tto_config(3))
    # Only the asked steps that the solve reaches are kept; 0 is theta0, 3 the solve's result.
    assert sorted(store) == [0, 1, 3]
    assert torch.equal(store[0], pred.theta0.flatten())
    assert torch.allclose(store[3], pred.theta.flatten(), atol=1e-6, rtol=0)
    with torch.no_grad():
        one = forward_model(enc, None, batch, tto=True, lambda_mode="constant", config=tto_config(1))
    assert torch.allclose(store[1], one.theta.flatten(), atol=1e-6, rtol=0)
    assert not torch.allclose(store[1], store[3])
    # Outside the block nothing is recorded.
    with torch.no_grad():
        forward_model(enc, None, batch, tto=True, lambda_mode="constant", config=tto_config(2))
    assert sorted(store) == [0, 1, 3]


@pytest.mark.parametrize("peak, grid, chosen, tried", [
    (1e-2, (0.1, 1.0, 10.0), 1e-2, [1e-3, 1e-2, 0.1, 1.0, 10.0]),  # below the grid: extended down
    (1.0, (0.1, 1.0, 10.0), 1.0, [0.1, 1.0, 10.0]),                # interior: the grid as given
    (1e3, (0.1, 1.0, 10.0), 1e3, [0.1, 1.0, 10.0, 1e2, 1e3, 1e4]),  # above: extended up
    (1e-6, (0.1, 1.0), 1e-3, [1e-3, 1e-2, 0.1, 1.0]),              # never below 10 x naive
])
def test_baseline_lambda_choice_leaves_no_optimum_on_the_grid_edge(monkeypatch, peak, grid,
                                                                   chosen, tried):
    import diff3r_plugin.evaluation.experiment as exp

    def fake_evaluate(models, val, cfg, *, method_overrides, **kw):
        lam = method_overrides["zero_shot_tto"]["constant_lambda"]
        psnr = 30.0 - abs(math.log10(lam) - math.log10(peak))  # a known peak at ``peak``
        return {"metrics": {"zero_shot_tto": {"psnr": psnr}},
                "psnr_vs_steps": {"zero_shot_tto": {"0": 0.0}}}

    monkeypatch.setattr(exp, "evaluate", fake_evaluate)
    best, rows = exp._choose_lambda(None, [], None, grid, [0, 1], False)
    assert best == pytest.approx(chosen)
    assert sorted(r["lambda"] for r in rows) == pytest.approx(sorted(tried))


def test_quick_experiment_trains_through_lm_and_evaluates_with_adam(tmp_path):
    """``train_inner_solver="lm"`` changes the training layer only: the test-time TTO (and so
    every reported PSNR) stays the protocol's Adam solve."""
    res = run_experiment(quick=True, out=str(tmp_path), progress=False, data=None, pose_free=False,
                         train_inner_solver="lm")
    tto = res["training"]["tto"]
    assert tto["inner_solver"] == "lm" and tto["eval_inner_solver"] == "adam"
    assert res["training"]["grad_cosine"]["samples"] > 0
    _check_table(res["embedded"], PROTOCOL, len(res["training"]["seeds"]))
    with pytest.raises(ValueError, match="train_inner_solver"):
        run_experiment(quick=True, progress=False, data=None, train_inner_solver="newton")


def test_quick_experiment_on_validation_never_touches_the_reported_scenes(tmp_path, monkeypatch):
    """``evaluate_on="validation"`` evaluates on the validation scenes only: the real windows and
    the held-out test scenes are not even loaded into the evaluation."""
    import diff3r_plugin.evaluation.experiment as exp
    from diff3r_plugin.data.embedded.dataset import HELD_OUT_SEED_START
    from diff3r_plugin.evaluation.experiment import VALIDATION_OFFSET

    seen = []
    real_evaluate = exp.evaluate

    def spy(models, examples, *args, **kwargs):
        seen.extend(name for ex in examples for name in ex["scene"])
        return real_evaluate(models, examples, *args, **kwargs)

    monkeypatch.setattr(exp, "evaluate", spy)
    res = run_experiment(quick=True, out=str(tmp_path), progress=False, data="default",
                         evaluate_on="validation")
    assert res["evaluated_on"] == "validation"
    assert res["real"] == {} and res["embedded"] == {} and res["pose_free"] == {}
    _check_table(res["validation"], PROTOCOL, len(res["training"]["seeds"]))
    assert {k for k, v in res["psnr_vs_steps"].items() if v} == {"validation"}
    assert (tmp_path / "grid_validation.png").is_file()
    first_val = HELD_OUT_SEED_START + VALIDATION_OFFSET
    assert seen and all(name.startswith("embedded_") and int(name.split("_")[1]) >= first_val
                        for name in seen), seen
    with pytest.raises(ValueError, match="evaluate_on"):
        run_experiment(quick=True, progress=False, data=None, evaluate_on="real")
