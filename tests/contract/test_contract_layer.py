"""Bad-input contract of the layer: ``diff3r_layer``, ``Diff3RLayer`` and ``ContextViews``."""

import dataclasses
import math
from dataclasses import dataclass

import torch
from contract_base import (F32, F64, Call, Case, ContractTester, Exact, Fallback, Raises, all_finite,
                           close, gaussians, lambda_for, views)
from torch import Tensor

from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.errors import (CameraConventionError, ConfigError, DTypeError, InvalidLambdaError,
                                  LayoutMismatchError, NonFiniteError, PCGNotConvergedError, ShapeError,
                                  ValueRangeError)
from diff3r_plugin.gaussians.layout import GaussianParams
from diff3r_plugin.layer import ContextViews, Diff3RInfo, Diff3RLayer, diff3r_layer

FAST = dict(steps=3, lm_pcg_iters=10, pcg_maxiter=40)
CONFIGS = {
    "lm": Diff3RConfig(**FAST),
    "adam": Diff3RConfig(inner_solver="adam", **FAST),
    "unroll": Diff3RConfig(backward="unroll", **FAST),
    "lm, raise": Diff3RConfig(on_failure="raise", **FAST),
    "unroll, raise": Diff3RConfig(backward="unroll", on_failure="raise", **FAST),
}


@dataclass
class LayerRun:
    theta_star: Tensor
    info: Diff3RInfo
    grad_theta0: Tensor | None
    grad_lam: Tensor | None


def call_layer(entry: str, theta0, lam, views, layout, config, cotangent=None, warm_start=None):
    if entry == "diff3r_layer":
        out, info = diff3r_layer(theta0, lam, views, layout, config, warm_start=warm_start)
    else:
        out, info = Diff3RLayer(config)(theta0, lam, views, layout, warm_start=warm_start)
    flat = out.flatten() if isinstance(out, GaussianParams) else out
    wrt = [t for t in (theta0, lam) if isinstance(t, Tensor) and t.requires_grad]
    grads = [None, None]
    if cotangent is not None and wrt and flat.requires_grad:
        got = torch.autograd.grad(flat, wrt, cotangent, allow_unused=True)
        it = iter(got)
        grads = [next(it) if isinstance(t, Tensor) and t.requires_grad else None for t in (theta0, lam)]
    return LayerRun(flat.detach(), info, grads[0], grads[1])


def problem(entry: str, *, dtype=F64, num=4, batch=1, pose_views=0, config="lm", edit=None,
            lam_value=0.5, cotangent_scale=1.0, view_kw=None, after=None):
    """Fresh inputs of one layer call; ``edit(theta0, layout)`` returns the bad theta0 and
    ``after(inputs)`` edits the other inputs."""
    p = gaussians(num, batch, F64, pose_views)
    layout = p.layout
    theta0 = p.flatten()
    if edit is not None:
        theta0 = edit(theta0, layout)
    theta0 = theta0.to(dtype) if theta0.is_floating_point() else theta0
    lam = lambda_for(layout, batch, dtype if dtype in (F32, F64) else F64, lam_value)
    v = views(batch, dtype if dtype in (F32, F64) else F64, num_views=max(2, pose_views + 1), **(view_kw or {}))
    gen = torch.Generator().manual_seed(7)
    cot = cotangent_scale * torch.randn(batch, layout.numel, generator=gen, dtype=F64)
    inputs = dict(theta0=theta0, lam=lam, views=v, layout=layout, config=CONFIGS[config],
                  cotangent=cot.to(dtype if dtype in (F32, F64) else F64))
    if after is not None:
        after(inputs)
    for name in ("theta0", "lam"):
        t = inputs[name]
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype in (F32, F64):
            inputs[name] = t.detach().requires_grad_(True)
    return Call(lambda **kw: call_layer(entry, **kw), inputs)


def set_group(group, value, index=0):
    def edit(theta0, layout):
        theta0 = theta0.clone()
        s = layout.slices[group]
        if group == "quats":
            theta0[:, s.start + 4 * index:s.start + 4 * index + 4] = value
        else:
            theta0[:, s.start + index] = value
        return theta0
    return edit


def scale_group(group, factor):
    def edit(theta0, layout):
        theta0 = theta0.clone()
        theta0[:, layout.slices[group]] *= factor
        return theta0
    return edit


# -- checks of results ------------------------------------------------------------------------

def reference(entry, **kw):
    call = problem(entry, **kw)
    return call.fn(**call.inputs)


def tiny_cotangent(entry):
    def check(run, inputs):
        unit = reference(entry, dtype=F32)
        assert bool(run.info.pcg_converged.all()) and bool(unit.info.pcg_converged.all())
        assert float(run.info.rhs_norm.min()) > 0
        for tiny, ref in ((run.grad_theta0, unit.grad_theta0), (run.grad_lam, unit.grad_lam)):
            assert float(tiny.abs().max()) > 0, "a 1e-30 cotangent gave exactly zero gradients"
            # Measured agreement 2e-7; 1e-2 leaves room for a PCG that stops at another
            # convergence check on other processors (both runs stop at a residual below 1e-3).
            assert close(tiny.double() / 1e-30, ref.double(), 1e-2)
    return Exact(check)


def empty_scene(run, inputs):
    assert torch.equal(run.theta_star, inputs["theta0"].detach())
    assert int(run.info.inner_steps.sum()) == 0
    # E = const + 1/2 |theta - theta0|^2_Lambda: theta* = theta0, the identity derivative.
    assert torch.equal(run.grad_theta0, inputs["cotangent"])
    assert run.grad_lam is None or float(run.grad_lam.abs().max()) == 0


def nan_cotangent(message):
    def check(run, inputs):
        assert all_finite(run.grad_theta0, run.grad_lam)
        # Scene 0's cotangent is zeroed (up to rounding-level coupling of the batched unrolled
        # solve), scene 1's gradient is kept.
        kept = float(run.grad_theta0[1].abs().max())
        assert kept > 0 and float(run.grad_theta0[0].abs().max()) <= 1e-12 * kept
        assert any(message in m for m in run.info.messages), run.info.messages
    return Fallback(check, "info.messages", warning=message)


def constant_views(run, inputs):
    assert any("treats the context views as constants" in m for m in run.info.messages)
    assert inputs["views"].images.grad is None


def huge_quaternions(entry, config):
    def check(run, inputs):
        ref = reference(entry, dtype=F32, config=config)
        assert all_finite(run.theta_star, run.grad_theta0, run.grad_lam)
        # The energy depends on q / |q| only: the same scene at theta0.
        assert close(run.info.initial_energy, ref.info.initial_energy, 1e-4)
    return Exact(check)


def gaussian_params_lambda(entry):
    def check(run, inputs):
        ref = reference(entry)
        assert torch.allclose(run.theta_star, ref.theta_star, rtol=1e-9, atol=1e-12)
        assert torch.allclose(run.grad_theta0, ref.grad_theta0, rtol=1e-9, atol=1e-12)
    return Exact(check)


def with_nan_row(inputs):
    inputs["cotangent"] = inputs["cotangent"].clone()
    inputs["cotangent"][0, 3] = math.nan


def lam_params(inputs):
    inputs["lam"] = GaussianParams.unflatten(inputs["lam"], inputs["layout"])


def views_requiring_grad(inputs):
    v = inputs["views"]
    inputs["views"] = dataclasses.replace(v, images=v.images.clone().requires_grad_(True))


def edit_views(**kw):
    def after(inputs):
        inputs["views"] = dataclasses.replace(inputs["views"], **{k: f(inputs["views"]) for k, f in kw.items()})
    return after


def set_field(name, fn):
    return edit_views(**{name: lambda v: fn(getattr(v, name).clone())})


def setitem(t, index, value):
    t[index] = value
    return t


def axes(*signs):
    def flip(v):
        return v.extrinsics @ torch.diag(torch.tensor([*signs, 1.0], dtype=v.extrinsics.dtype))
    return flip


def pixel_k(v):
    # K of a 256 x 256 image in pixel units (the tiny test images would hide it: cx = 4 px
    # is a legal normalized value).
    k = v.intrinsics.clone()
    k[..., :2, :] *= 256
    return k


def blind(run, inputs):
    assert torch.equal(run.theta_star, inputs["theta0"].detach())
    assert any("is visible in any context view" in m for m in run.info.messages), run.info.messages


def layer_cases(entry: str) -> list[Case]:
    def c(klass, outcome, variant="", **kw):
        return Case(klass, lambda: problem(entry, **kw), outcome, variant)

    theta_at_inf = Raises(NonFiniteError, "at theta0")
    cases = [
        # -- silent before: now typed errors or correct answers --------------------------------
        Case("tiny cotangent", lambda: problem(entry, dtype=F32, cotangent_scale=1e-30),
             tiny_cotangent(entry), "float32"),
        c("NaN background", Raises(NonFiniteError, "background"),
          view_kw=dict(background=torch.tensor([0.0, math.nan, 0.0], dtype=F64))),
        c("negative pixel weights", Raises(ValueRangeError, "negative"),
          view_kw=dict(weights=-torch.ones(1, 2, 1, 8, 8, dtype=F64))),
        c("overflowing render at theta0", theta_at_inf, "log_scales 60",
          dtype=F32, edit=set_group("log_scales", 60.0)),
        c("overflowing render at theta0", theta_at_inf, "colour 1e25",
          dtype=F32, edit=set_group("sh_dc", 1e25)),
        c("empty scene", Exact(empty_scene), "lm", num=0, pose_views=1),
        c("empty scene", Exact(empty_scene), "adam", num=0, pose_views=1, config="adam"),
        c("empty scene", Exact(empty_scene), "unroll", num=0, pose_views=1, config="unroll"),
        c("near >= far", Raises(ValueRangeError, "far must be > near"),
          after=set_field("far", lambda t: setitem(t, (0, 1), 0.5))),
        c("NaN near", Raises(NonFiniteError, "near contains"),
          after=set_field("near", lambda t: setitem(t, (0, 0), math.nan))),
        c("negative near", Raises(ValueRangeError, "near must be > 0"),
          after=set_field("near", lambda t: -t)),
        c("zero quaternion", Raises(ValueRangeError, "exactly zero"), "implicit",
          edit=set_group("quats", 0.0)),
        c("zero quaternion", Raises(ValueRangeError, "exactly zero"), "unroll",
          edit=set_group("quats", 0.0), config="unroll"),
        c("huge quaternions", huge_quaternions(entry, "lm"), "1e20 float32 implicit",
          dtype=F32, edit=scale_group("quats", 1e20)),
        c("huge quaternions", huge_quaternions(entry, "unroll"), "1e20 float32 unroll",
          dtype=F32, edit=scale_group("quats", 1e20), config="unroll"),
        c("views require grad", Fallback(constant_views, "info.messages",
                                         warning="treats the context views as constants"),
          after=views_requiring_grad),
        c("NaN cotangent", nan_cotangent("implicit solve produced NaN/Inf"), "implicit",
          batch=2, after=with_nan_row),
        c("NaN cotangent", nan_cotangent("backward='unroll'"), "unroll",
          batch=2, config="unroll", after=with_nan_row),
        c("NaN cotangent", Raises(PCGNotConvergedError, "implicit solve produced NaN/Inf"), "implicit, raise",
          batch=2, config="lm, raise", after=with_nan_row),
        c("NaN cotangent", Raises(NonFiniteError, "backward='unroll'"), "unroll, raise",
          batch=2, config="unroll, raise", after=with_nan_row),
        # -- generic errors before ---------------------------------------------------------------
        c("mixed parameter dtypes", Raises(DTypeError, "share one dtype"), "float32 theta0, float64 lam",
          dtype=F32, after=lambda i: i.update(lam=i["lam"].double())),
        c("integer theta0", Raises(DTypeError, "float32 or float64"),
          dtype=torch.int64, edit=lambda t, _: t.round().long()),
        c("half-precision theta0", Raises(DTypeError, "float32 or float64"), "float16",
          dtype=torch.float16, after=lambda i: i.update(lam=i["lam"].half())),
        c("half-precision theta0", Raises(DTypeError, "float32 or float64"), "bfloat16",
          dtype=torch.bfloat16, after=lambda i: i.update(lam=i["lam"].bfloat16())),
        c("NaN theta0", Raises(NonFiniteError, "group 'means'"), edit=set_group("means", math.nan)),
        # -- already typed -----------------------------------------------------------------------
        c("invalid Lambda", Raises(InvalidLambdaError, "opacity_logits"), "zero",
          after=lambda i: i.update(lam=setitem(i["lam"].clone(), (0, i["layout"].slices["opacity_logits"].start), 0.0))),
        c("invalid Lambda", Raises(InvalidLambdaError, "NaN"), "NaN",
          after=lambda i: i.update(lam=setitem(i["lam"].clone(), (0, 0), math.nan))),
        c("theta0 of the wrong length", Raises(LayoutMismatchError, "needs [batch"),
          edit=lambda t, _: t[:, :-1]),
        c("batch mismatch", Raises(LayoutMismatchError, "batch"), batch=1,
          after=lambda i: i.update(views=views(2))),
        c("more pose deltas than views", Raises(LayoutMismatchError, "pose deltas"), pose_views=2,
          after=lambda i: i.update(views=views(1, num_views=2))),
        c("images in [-1, 1]", Raises(ShapeError, "x * 0.5 + 0.5"),
          after=set_field("images", lambda t: 2 * t - 1)),
        c("NaN image", Raises(NonFiniteError, "images"),
          after=set_field("images", lambda t: setitem(t, (0, 0, 0, 0, 0), math.nan))),
        c("OpenGL extrinsics", Fallback(blind, "info.messages", warning="is visible in any context view"),
          "all Gaussians behind the cameras", after=edit_views(extrinsics=axes(1.0, -1.0, -1.0))),
        c("reflected extrinsics", Raises(CameraConventionError, "reflection"),
          after=edit_views(extrinsics=axes(1.0, -1.0, 1.0))),
        c("intrinsics in pixels", Raises(CameraConventionError, "normalized"), after=edit_views(intrinsics=pixel_k)),
        c("theta0 not a tensor", Raises(DTypeError, "torch.Tensor"),
          after=lambda i: i.update(theta0=i["theta0"].tolist())),
        c("NaN warm start", Raises(NonFiniteError, "warm_start"),
          after=lambda i: i.update(warm_start=torch.full_like(i["theta0"], math.nan))),
        c("views missing", Raises(LayoutMismatchError, "views are missing"),
          after=lambda i: i.update(views=None)),
        c("background of the wrong shape", Raises(ShapeError, "background"),
          view_kw=dict(background=torch.zeros(2, dtype=F64))),
    ]
    if entry == "Diff3RLayer":
        cases.append(c("flat theta0 with GaussianParams Lambda", gaussian_params_lambda(entry),
                       after=lam_params))
    return cases


class LayerContract(ContractTester):
    def good_call(self) -> Call:
        return problem(self.ENTRY)

    def check_result(self, run: LayerRun, caught) -> None:
        # No NaN/Inf leaves the layer, forward or backward, without a message in info.
        for t in (run.theta_star, run.grad_theta0, run.grad_lam):
            if not all_finite(t):
                assert run.info.messages, "non-finite output without a report in info.messages"
        assert all_finite(run.info.stationarity) or run.info.messages


class TestDiff3RLayerFunctional(LayerContract):
    ENTRY = "diff3r_layer"
    CASES = layer_cases("diff3r_layer")


class TestDiff3RLayerModule(LayerContract):
    ENTRY = "Diff3RLayer"
    CASES = layer_cases("Diff3RLayer")


# -- ContextViews on its own ---------------------------------------------------------------------

def views_call(**kw):
    def build():
        base = views()
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        for k, f in kw.items():
            fields[k] = f(fields[k])
        return Call(lambda **inputs: ContextViews(**inputs).validate(), fields)
    return build


class TestContextViews(ContractTester):
    ENTRY = "ContextViews"
    CASES = [
        Case("near >= far", views_call(far=lambda t: t * 0 + 0.5), Raises(ValueRangeError, "far must be > near")),
        Case("NaN near", views_call(near=lambda t: t * math.nan), Raises(NonFiniteError, "near contains")),
        Case("negative near", views_call(near=lambda t: -t), Raises(ValueRangeError, "near must be > 0")),
        Case("integer near", views_call(near=lambda t: t.long() + 1), Raises(DTypeError, "near must be floating")),
        Case("NaN background", views_call(background=lambda _: torch.tensor([math.nan, 0.0, 0.0], dtype=F64)),
             Raises(NonFiniteError, "background")),
        Case("background of the wrong shape", views_call(background=lambda _: torch.zeros(1, 2, 3, dtype=F64)),
             Raises(ShapeError, "background")),
        Case("negative pixel weights", views_call(weights=lambda _: -torch.ones(1, 2, 1, 8, 8, dtype=F64)),
             Raises(ValueRangeError, "negative")),
        Case("NaN pixel weights", views_call(weights=lambda _: torch.full((1, 2, 1, 8, 8), math.nan, dtype=F64)),
             Raises(NonFiniteError, "weights")),
        Case("pixel weights of the wrong shape", views_call(weights=lambda _: torch.ones(1, 2, 8, 8, dtype=F64)),
             Raises(ShapeError, "weights")),
        Case("unknown SH basis", views_call(sh_basis=lambda _: "e3mm"), Raises(ConfigError, "sh_basis")),
        Case("extrinsics not a tensor", views_call(extrinsics=lambda t: t.tolist()), Raises(DTypeError, "extrinsics")),
        Case("integer images", views_call(images=lambda t: (t * 255).to(torch.uint8)), Raises(DTypeError, "floating")),
        Case("images of the wrong shape", views_call(images=lambda t: t[:, :, :2]), Raises(ShapeError, "[batch, view, 3")),
    ]

    def good_call(self) -> Call:
        return views_call()()
