"""``diff3r bench step``: the parts of one outer step add up to the step, and the CLI's figures."""

import argparse
import time

import pytest
import torch

from diff3r_plugin.bench import step_bench
from diff3r_plugin.bench.step_bench import LAYER_PARTS, PARTS, one_step, parse_overrides

FAST = ["diff3r.steps=2", "diff3r.inner_solver=adam", "diff3r.stationarity_tol=0",
        "diff3r.pcg_maxiter=4", "diff3r.on_failure=fallback"]


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    step_bench.add_arguments(parser)
    return parser.parse_args(["--size", "16", "--steps", "2", "--no-memory", *extra])


@pytest.mark.parametrize("kind", ["builtin-pose-given", "builtin-pose-free"])
def test_parts_add_up_to_the_step(kind):
    torch.manual_seed(0)
    args = _args("--model", kind, *FAST)
    model = step_bench._build(args)
    one_step(model, True, torch.device("cpu"))  # warm-up
    for use_layer in (False, True):
        shares = []
        for _ in range(3):
            t0 = time.perf_counter()
            total, ms, info = one_step(model, use_layer, torch.device("cpu"))
            outside = (time.perf_counter() - t0) * 1e3
            named = sum(ms[name] for name in PARTS)
            # The named parts do not overlap (nested parts are exclusive).
            assert named <= total * 1.001 and total <= outside
            assert abs(named + ms["rest"] - total) < 1e-6 * total
            assert ms["encoder"] > 0 and ms["target_render"] > 0
            if use_layer:
                assert all(ms[name] > 0 for name in LAYER_PARTS), ms
                assert int(info.inner_steps.max()) == 2
            else:
                assert all(ms[name] == 0 for name in LAYER_PARTS), ms
                assert info is None
            shares.append(ms["rest"] / total)
        # ... and cover the step: what no part claims ("rest": the loss, the recorder) is under
        # 10 % of the total (median of three steps: one can be preempted on a loaded machine).
        assert sorted(shares)[1] <= 0.1, shares


def test_staged_backward_gives_the_gradient_of_one_backward():
    """The bench's two-stage backward (render, then layer + encoder) is ``loss.backward()``."""
    torch.manual_seed(0)
    model = step_bench._build(_args(*FAST))
    one_step(model, True, torch.device("cpu"))
    staged = [p.grad.clone() for p in model.parameters]
    for p in model.parameters:
        p.grad = None
    tensors, _ = model.encode(True)
    torch.nn.functional.mse_loss(model.render(tensors), model.target).backward()
    for a, p in zip(staged, model.parameters):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_json_figures():
    result = step_bench.run(_args("--set", "diff3r.pcg_maxiter=4", "--set=diff3r.stationarity_tol=0",
                                  "diff3r.steps=2", "diff3r.inner_solver=adam", "diff3r.on_failure=fallback"))
    assert result["overrides"][0] == "diff3r.pcg_maxiter=4"
    assert result["inner_steps"] == 2 and 1 <= result["pcg_iters"] <= 4
    assert result["ratio"] == pytest.approx(result["diff3r_ms"] / result["plain_ms"], rel=1e-2)
    assert set(result["parts"]) == set(PARTS) | {"rest"}
    # Medians of the parts against the median of the totals (different repeats may be medians).
    assert sum(result["parts"].values()) == pytest.approx(result["diff3r_ms"], rel=0.1)
    assert result["peak_mb"] is None  # --no-memory


def test_memory_worker_reports_the_extra_peak():
    args = _args(*FAST)
    args.no_memory = False
    peaks = step_bench._memory(args)
    assert peaks is not None and peaks["diff3r"] > 0 and peaks["plain"] >= 0


def test_overrides_are_parsed_and_checked():
    assert parse_overrides(["diff3r.pcg_maxiter=20", "diff3r.lr.means=1e-3"]) == {
        "pcg_maxiter": 20, "lr": {"means": 1e-3}}
    with pytest.raises(ValueError, match="diff3r.KEY=VALUE"):
        parse_overrides(["pcg_maxiter=20"])
    with pytest.raises(Exception, match="pcg_maxiterr"):
        step_bench._config_from(_args("diff3r.pcg_maxiterr=3"))
