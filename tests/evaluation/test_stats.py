import numpy as np
import pytest

from diff3r_plugin.evaluation.stats import paired_bootstrap


def test_constant_difference_has_a_point_interval():
    a = np.array([[20.0, 25.0, 30.0, 18.0]])
    out = paired_bootstrap(a + 0.7, a)
    assert out["mean"] == pytest.approx(0.7)
    assert out["ci95"] == pytest.approx([0.7, 0.7])
    assert out["per_seed"] == pytest.approx([0.7])


def test_interval_matches_the_normal_theory_width():
    # d_i ~ N(0.5, 1): the 95 % interval of the mean is 0.5 +- 1.96 / sqrt(n) (up to sampling).
    rng = np.random.default_rng(1)
    n = 400
    base = rng.uniform(15, 30, size=n)          # per-view difficulty: must cancel (paired)
    d = rng.normal(0.5, 1.0, size=n)
    out = paired_bootstrap(base + d, base, resamples=20_000)
    half = 1.96 / np.sqrt(n)
    assert out["mean"] == pytest.approx(d.mean())
    low, high = out["ci95"]
    assert high - low == pytest.approx(2 * half, rel=0.1)
    assert low < d.mean() < high
    # Unpaired resampling would be ~15x wider because of the per-view spread of `base`.
    assert high - low < 0.3


def test_seeds_are_averaged_per_view_and_reported_each():
    a = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    b = np.zeros_like(a)
    out = paired_bootstrap(a, b)
    assert out["per_seed"] == pytest.approx([2.0, 4.0])
    assert out["mean"] == pytest.approx(3.0)
    assert out["num_seeds"] == 2 and out["num_views"] == 3


@pytest.mark.user_errors
@pytest.mark.parametrize("a, b, phrase", [
    (np.zeros((1, 3)), np.zeros((1, 4)), "equal"),
    (np.zeros((1, 0)), np.zeros((1, 0)), "at least one"),
    (np.array([[np.nan, 1.0]]), np.zeros((1, 2)), "NaN"),
])
def test_bad_input_is_named(a, b, phrase):
    with pytest.raises(ValueError, match=phrase):
        paired_bootstrap(a, b)
