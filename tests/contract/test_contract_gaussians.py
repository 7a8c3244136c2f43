"""Bad-input contract of the Gaussian layout: ``GaussianLayout``, ``from_upstream``, ``to_upstream``."""

import math

import numpy as np
import torch
from contract_base import F32, F64, Call, Case, ContractTester, Exact, Fallback, Raises, all_finite, gaussians

from diff3r_plugin.errors import (ConfigError, DTypeError, InvalidCovarianceError, NonFiniteError,
                                  ShapeError, ValueRangeError)
from diff3r_plugin.gaussians.layout import GaussianLayout, from_upstream, to_upstream


def layout_call(*args, **kw):
    return lambda: Call(lambda: GaussianLayout(*args, **kw))


def numpy_int(layout, inputs):
    assert type(layout.num_gaussians) is int and layout.numel == 3 * 59


class TestGaussianLayout(ContractTester):
    ENTRY = "GaussianLayout"
    CASES = [
        Case("non-integer size", layout_call(2.5), Raises(ShapeError, "must be an int"), "num_gaussians=2.5"),
        Case("non-integer size", layout_call(True), Raises(ShapeError, "must be an int"), "num_gaussians=True"),
        Case("non-integer size", layout_call(3, sh_degree=1.0), Raises(ShapeError, "must be an int"), "sh_degree=1.0"),
        Case("integer-like size", layout_call(np.int64(3), sh_degree=3), Exact(numpy_int), "numpy int64"),
        Case("SH degree above 3", layout_call(3, sh_degree=4), Raises(ShapeError, "[0, 3]")),
        Case("negative size", layout_call(-1), Raises(ShapeError, "invalid layout")),
    ]

    def good_call(self) -> Call:
        return layout_call(4, 1, 1)()


def upstream(dtype=F64, num=4, degree=0, **overrides):
    means, cov, harmonics, opacities = (t.detach() for t in to_upstream(gaussians(num, 1, dtype, sh_degree=degree)))
    inputs = dict(means=means, covariances=cov, harmonics=harmonics, opacities=opacities)
    for k, f in overrides.items():
        inputs[k] = f(inputs[k]) if callable(f) else f
    return inputs


def upstream_call(**kw):
    return lambda: Call(from_upstream, upstream(**kw))


def setitem(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def tiny_covariances(out, inputs):
    """Covariances of 1e-30 (float32) are resolved, not clamped: log-scales shift by log(1e-15)."""
    params, extras = out
    ref, _ = from_upstream(**upstream(F32))
    assert extras.num_scales_clamped == 0 and extras.num_projected == 0
    expected = ref.log_scales.sort(-1).values + 0.5 * math.log(1e-30)
    assert torch.allclose(params.log_scales.sort(-1).values, expected, rtol=0, atol=1e-4)


def copies(out, inputs):
    """Editing the returned parameters in place leaves the upstream Gaussians alone (the
    harness checks the inputs after this)."""
    params, extras = out
    params.means.add_(1.0)
    params.sh_dc.mul_(2.0)
    params.sh_rest.mul_(2.0)
    extras.harmonics_high.mul_(2.0)


def projected(out, inputs):
    params, extras = out
    assert extras.num_projected == 1 and all_finite(params.log_scales, params.quats)


def opacity_clamped(out, inputs):
    params, extras = out
    assert extras.num_opacity_clamped == 1 and all_finite(params.opacity_logits)


def asym(c):
    return setitem(c, (0, 0, 0, 1), 1.0)


class TestFromUpstream(ContractTester):
    ENTRY = "from_upstream"
    CASES = [
        Case("unknown on_invalid", upstream_call(on_invalid="bogus"), Raises(ConfigError, "on_invalid")),
        Case("tiny covariances", upstream_call(dtype=F32, covariances=lambda c: c * 1e-30), Exact(tiny_covariances),
             "1e-30 float32"),
        Case("in-place edit of the outputs", upstream_call(degree=2, sh_degree=1), Exact(copies)),
        Case("non-SPD covariance", upstream_call(covariances=asym), Raises(InvalidCovarianceError, "on_invalid='project'"),
             "raise"),
        Case("non-SPD covariance", upstream_call(covariances=asym, on_invalid="project"),
             Fallback(projected, "extras.num_projected"), "project"),
        Case("opacities outside [eps, 1 - eps]", upstream_call(opacities=lambda o: setitem(o, (0, 0), 1.0)),
             Fallback(opacity_clamped, "extras.num_opacity_clamped")),
        Case("SH degree above 3", upstream_call(degree=3, sh_degree=5), Raises(ShapeError, "[0, 3]")),
        Case("SH degree above the harmonics", upstream_call(sh_degree=2), Raises(ShapeError, "needs 9 coefficients")),
        Case("mixed dtypes", upstream_call(opacities=lambda o: o.float()), Raises(DTypeError, "share one dtype")),
        Case("NaN means", upstream_call(means=lambda m: setitem(m, (0, 0, 0), math.nan)), Raises(NonFiniteError, "means")),
        Case("integer means", upstream_call(means=lambda m: m.long()), Raises(DTypeError, "means")),
        Case("negative num_pose_views", upstream_call(num_pose_views=-1), Raises(ShapeError, "num_pose_views")),
        Case("covariances of the wrong shape", upstream_call(covariances=lambda c: c[..., :2, :2]),
             Raises(ShapeError, "covariances")),
    ]

    def good_call(self) -> Call:
        return upstream_call()()

    def check_result(self, out, caught) -> None:
        params, _ = out
        assert all_finite(params.flatten())


def params_call(edit):
    def build():
        p = gaussians(4, 1, F64)
        return Call(to_upstream, dict(params=edit(p)))
    return build


def zero_quat(p):
    p.quats = setitem(p.quats, (0, 2), 0.0)
    return p


class TestToUpstream(ContractTester):
    ENTRY = "to_upstream"
    CASES = [Case("zero quaternion", params_call(zero_quat), Raises(ValueRangeError, "exactly zero"))]

    def good_call(self) -> Call:
        return params_call(lambda p: p)()
