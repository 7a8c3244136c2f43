"""Statistics over seeds and target views: the paired bootstrap of a difference of methods.

For two methods A and B evaluated on the same target views (and the same training seeds),
the quantity of interest is the mean paired difference

    d̄ = (1/N) Σ_i (a_i − b_i),     a_i, b_i: metric of view i, averaged over seeds.

Its 95 % interval is the percentile interval of d̄ over bootstrap resamples of the N views,
drawn with replacement; both methods keep the same resampled views (paired), so per-view
difficulty cancels and only the method difference varies.
"""

from typing import Sequence

import numpy as np
from jaxtyping import Float

__all__ = ["paired_bootstrap", "PairedSummary"]

PairedSummary = dict


def paired_bootstrap(
    a: Float[np.ndarray, "seed view"] | Float[np.ndarray, "view"] | Sequence,
    b: Float[np.ndarray, "seed view"] | Float[np.ndarray, "view"] | Sequence,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedSummary:
    """Mean, bootstrap interval and per-seed means of ``a − b``.

    ``a`` and ``b`` hold one row per training seed and one column per target view (the same
    views in the same order in both); a 1-D array is one seed. Returns ``{"mean", "ci95": [low, high], "per_seed",
    "num_views", "num_seeds"}``; ``ci95`` is the ``level`` percentile interval.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if b.ndim == 1:
        b = b[None]
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"paired_bootstrap needs two equal [seed, view] arrays with at least one "
                         f"view; got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap: the metric arrays contain NaN or inf")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diff = (a - b).mean(axis=0)  # per view, averaged over seeds
    n = diff.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(resamples), n))
    means = diff[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {
        "mean": float(diff.mean()),
        "ci95": [float(low), float(high)],
        "per_seed": [float(x) for x in (a - b).mean(axis=1)],
        "num_views": int(n),
        "num_seeds": int(a.shape[0]),
    }
