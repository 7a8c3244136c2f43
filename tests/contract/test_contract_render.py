"""Bad-input contract of the renderer entry points ``render`` and ``render_params``."""

import math

import torch
from contract_base import (F32, F64, SIZE, Call, Case, ContractTester, Exact, Raises, all_finite, cameras,
                           close, gaussians)

from diff3r_plugin.errors import (DTypeError, InvalidCovarianceError, NonFiniteError, ShapeError,
                                  ValueRangeError)
from diff3r_plugin.gaussians.layout import to_upstream
from diff3r_plugin.render.api import render, render_params


def render_inputs(dtype=F64, camera_dtype=None, num=4, **overrides):
    means, cov, harmonics, opacities = to_upstream(gaussians(num, 1, dtype))
    extr, intr, near, far = cameras(2, 1, camera_dtype or dtype)
    inputs = dict(means=means.detach(), covariances=cov.detach(), harmonics=harmonics.detach(),
                  opacities=opacities.detach(), extrinsics=extr, intrinsics=intr, near=near, far=far,
                  image_shape=(SIZE, SIZE), background_color=None)
    for k, f in overrides.items():
        inputs[k] = f(inputs[k]) if callable(f) else f  # new keys: keyword-only arguments
    return inputs


def render_call(**kw):
    return lambda: Call(render, render_inputs(**kw))


def setitem(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def same_as_one_dtype(out, inputs):
    """float64 Gaussians with float32 cameras render as with the cameras cast to float64."""
    ref = render(**render_inputs())
    assert out.color.dtype == F64
    assert close(out.color, ref.color, 1e-6)


def background_only(out, inputs):
    assert out.color.shape == (1, 2, 3, SIZE, SIZE)
    assert torch.equal(out.color, torch.zeros_like(out.color)) and float(out.alpha.abs().max()) == 0


def asym(c):
    c = c.clone()
    c[0, 0, 0, 1] += 1.0
    return c


class TestRender(ContractTester):
    ENTRY = "render"
    CASES = [
        Case("NaN background", render_call(background_color=torch.tensor([math.nan, 0.0, 0.0], dtype=F64)),
             Raises(NonFiniteError, "background_color")),
        Case("non-integer image size", render_call(image_shape=(8.5, 8)), Raises(ShapeError, "two positive ints")),
        Case("non-positive image size", render_call(image_shape=(0, 8)), Raises(ShapeError, "two positive")),
        Case("SH degree above 3", render_call(sh_degree=5), Raises(ShapeError, "[0, 3]"), "sh_degree=5"),
        Case("SH degree above the harmonics", render_call(sh_degree=2), Raises(ShapeError, "needs 9 SH coefficients"),
             "sh_degree=2 of degree-0 harmonics"),
        Case("mixed dtypes", render_call(camera_dtype=F32), Exact(same_as_one_dtype),
             "float64 Gaussians, float32 cameras"),
        Case("mixed dtypes", render_call(opacities=lambda t: t.float()), Raises(DTypeError, "share one dtype"),
             "Gaussian fields"),
        Case("near >= far", render_call(far=lambda t: t * 0 + 0.5), Raises(ValueRangeError, "far > near")),
        Case("NaN means", render_call(means=lambda t: setitem(t, (0, 0, 0), math.nan)), Raises(NonFiniteError, "means")),
        Case("opacities outside [0, 1]", render_call(opacities=lambda t: t + 1), Raises(ValueRangeError, "opacities")),
        Case("unknown backend", render_call(backend="cuda"), Raises(ShapeError, "unknown backend"), "backend='cuda'"),
        Case("integer extrinsics", render_call(extrinsics=lambda t: t.long()), Raises(DTypeError, "extrinsics")),
        Case("non-SPD covariance", render_call(covariances=asym), Raises(InvalidCovarianceError, "positive definite")),
        Case("empty scene", render_call(num=0), Exact(background_only)),
        Case("harmonics of a non-square size", render_call(harmonics=lambda t: torch.cat([t, t], -1)),
             Raises(ShapeError, "must be a square")),
    ]

    def good_call(self) -> Call:
        return Call(render, render_inputs())

    def check_result(self, out, caught) -> None:
        assert all_finite(out.color, out.depth, out.alpha)


def params_call(dtype=F64, edit=None):
    def build():
        p = gaussians(4, 1, dtype)
        if edit is not None:
            p = edit(p)
        extr, intr, near, far = cameras(2, 1, dtype)
        return Call(render_params, dict(params=p, extrinsics=extr, intrinsics=intr, near=near, far=far,
                                        image_shape=(SIZE, SIZE)))
    return build


def scaled_quats(factor):
    def edit(p):
        p.quats = p.quats * factor
        return p
    return edit


def zero_quat(p):
    p.quats = setitem(p.quats, (0, 1), 0.0)
    return p


def same_as_unit(out, inputs):
    p = inputs["params"]
    ref = params_call(p.means.dtype)()
    assert close(out.color, render_params(**ref.inputs).color, 1e-5)


class TestRenderParams(ContractTester):
    ENTRY = "render_params"
    CASES = [
        Case("zero quaternion", params_call(edit=zero_quat), Raises(ValueRangeError, "exactly zero")),
        Case("huge quaternions", params_call(F32, scaled_quats(1e20)), Exact(same_as_unit), "1e20 float32"),
        Case("tiny quaternions", params_call(F32, scaled_quats(1e-30)), Exact(same_as_unit), "1e-30 float32"),
        Case("more pose deltas than views", params_call(edit=lambda p: type(p)(
            p.means, p.log_scales, p.quats, p.opacity_logits, p.sh_dc, p.sh_rest, p.means.new_zeros(1, 3, 6))),
             Raises(ShapeError, "pose deltas")),
    ]

    def good_call(self) -> Call:
        return params_call()()

    def check_result(self, out, caught) -> None:
        assert all_finite(out.color, out.depth, out.alpha)
