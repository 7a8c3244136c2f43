"""``diff3r bench layer`` on a tiny scene: the JSON fields the layer is checked by, with real values."""

import json
import math
import subprocess
import sys

REQUIRED_RUN_FIELDS = ("steps", "inner_solver", "ift_peak_mb", "unroll_peak_mb", "ift_backward_ms",
                       "unroll_backward_ms", "grad_cosine_theta0", "grad_cosine_lambda", "pcg_iters",
                       "pcg_rel_residual", "stationarity")


def test_bench_layer_json_fields_and_probe(tmp_path):
    cmd = [sys.executable, "-m", "diff3r_plugin.cli", "bench", "layer", "--json", "--gaussians", "16",
           "--size", "8", "--views", "2", "--inner-solver", "lm", "--steps", "2", "--probe",
           "--memory-limit-gb", "0", "--plot", str(tmp_path / "layer.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    for key in ("gaussians", "size", "views", "precond", "runs"):
        assert key in result
    assert (result["gaussians"], result["size"], result["views"]) == (16, 8, 2)
    (run,) = result["runs"]
    for key in REQUIRED_RUN_FIELDS:
        assert run[key] is not None, key
    assert run["inner_solver"] == "lm" and 1 <= run["steps"] <= 2
    assert run["ift_peak_mb"] > 0 and run["unroll_peak_mb"] > 0
    assert -1.0 <= run["grad_cosine_theta0"] <= 1.0 and -1.0 <= run["grad_cosine_lambda"] <= 1.0
    assert 0 < run["stationarity"] < 1
    for key in ("grad_cosine_theta0_outside_top1pct", "grad_cosine_lambda_outside_top1pct"):
        assert -1.0 <= run[key] <= 1.0, key
    groups = run["stationarity_groups"]
    assert math.isclose(math.sqrt(sum(v * v for v in groups.values())), run["stationarity"], rel_tol=1e-4)
    assert 0 < run["grad_share_top1pct"] <= 1
    probe = run["line_probe"]
    assert [p["step"] for p in probe] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    assert abs(probe[0]["ratio"] - 1.0) < 1e-2  # smooth at the smallest step on this scene
    assert all(p["pairs_changed"] >= 0 and p["order_changed_pixels"] >= 0 for p in probe)
    png = (tmp_path / "layer.png").read_bytes()
    assert result["plot"] == str(tmp_path / "layer.png") and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_perturbation_sets_how_far_the_true_scene_is_from_theta0():
    import argparse

    import torch

    from diff3r_plugin.bench.layer_bench import build_problem
    from diff3r_plugin.gaussians.layout import GaussianParams
    from diff3r_plugin.render import render_params

    def context_error(perturbation: float) -> float:
        args = argparse.Namespace(gaussians=32, size=16, views=2, seed=0, lam=1.0, perturbation=perturbation)
        views, layout, theta0, _, _, _ = build_problem(args)
        own = render_params(GaussianParams.unflatten(theta0, layout), views.extrinsics, views.intrinsics,
                            views.near, views.far, views.image_shape).color
        return float((own - views.images).abs().max())

    assert context_error(0.0) == 0.0  # the context views are theta0's own renders
    small, large = context_error(0.01), context_error(0.1)
    assert 0.0 < small < large


def test_bench_layer_frozen_visibility_reports_the_per_step_energy(tmp_path):
    cmd = [sys.executable, "-m", "diff3r_plugin.cli", "bench", "layer", "--json", "--gaussians", "16",
           "--size", "8", "--views", "2", "--inner-solver", "lm", "--steps", "3", "--no-unroll",
           "--visibility", "frozen", "--memory-limit-gb", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["visibility"] == "frozen"
    (run,) = result["runs"]
    assert 0 < run["stationarity"] < 1
    # The per-step energy has the same gradient at theta0 (the pair lists are theta0's there),
    # and a positive one at theta_K.
    assert run["stationarity_replanned"] > 0
    assert run["stale_pairs"] >= 0 and run["stale_order_pixels"] >= 0
