"""Input checks and failure reports of the layer, kept out of the solver code.

Each function here guards one way a bad input could otherwise end in a silent wrong answer
(a zero or NaN gradient, ``theta* = theta0`` reported as converged) or in a generic torch error;
:func:`~diff3r_plugin.layer.layer.diff3r_layer` calls them at the points named in their
docstrings. The policy is the project's: a typed error from :mod:`diff3r_plugin.errors` that
names the tensor, group or key at fault, or a fallback that ``info.messages`` and a warning
report.
"""

import warnings
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import DTypeError, NonFiniteError
from ..gaussians.layout import GaussianLayout, check_quaternions

# The inner solve and its backward need a dtype whose linear algebra (inv, eigh, PCG) is
# available and accurate enough: half precisions fail inside torch.linalg or lose the
# stationarity test to rounding.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_parameters(theta0: Tensor, lam: Tensor, layout: GaussianLayout,
                     warm_start: Tensor | None = None) -> None:
    """Types, dtypes, finiteness and quaternions of the layer's parameter vectors.

    ``theta0``, ``lam`` and ``warm_start`` must be tensors of one dtype, float32 or float64:
    mixed dtypes raise :class:`DTypeError` naming both tensors (they are not promoted, because
    the layer's gradients must come back in the caller's dtype). The context views are data
    and are cast to ``theta0``'s dtype (see :class:`~diff3r_plugin.layer.views.ContextViews`).
    A NaN/Inf in ``theta0`` raises :class:`NonFiniteError` naming its attribute group, and a
    zero quaternion raises :class:`~diff3r_plugin.errors.ValueRangeError` (it has no rotation).
    """
    named = [("theta0", theta0), ("lam", lam)] + ([] if warm_start is None else [("warm_start", warm_start)])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor (a flat [batch, {layout.numel}] vector), "
                             f"got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise DTypeError(f"{name} has dtype {t.dtype}; the layer needs float32 or float64 "
                             "(cast with .float() or .double())")
    for name, t in named[1:]:
        if t.dtype != theta0.dtype:
            raise DTypeError(f"theta0 is {theta0.dtype} but {name} is {t.dtype}: the parameter "
                             f"vectors must share one dtype (cast {name} with .to(theta0.dtype))")
    if theta0.ndim == 2 and theta0.shape[1] == layout.numel:
        bad = ~torch.isfinite(theta0.detach())
        if bool(bad.any()):
            first = int(torch.nonzero(bad.any(0))[0])
            group = group_of(layout, first)
            raise NonFiniteError(f"theta0 contains {int(bad.sum())} NaN/Inf value(s) (first in group "
                                 f"{group!r})")
        if layout.num_gaussians:
            check_quaternions(layout.split(theta0.detach())["quats"], "theta0 quats")


def group_of(layout: GaussianLayout, index: int) -> str:
    """The attribute group of flat entry ``index``."""
    return next(g for g, s in layout.slices.items() if s.start <= index < s.stop)


def skip_solve_if_empty(config, layout: GaussianLayout):
    """A scene without Gaussians has a constant residual: ``E = const + 1/2 |theta - theta0|^2_Lambda``
    has ``theta* = theta0`` and ``dtheta*/dtheta0 = I``, ``dtheta*/dLambda = 0``, which is the
    ``steps=0`` path; the solvers' Jacobian code has nothing to reshape there."""
    return replace(config, steps=0) if layout.num_gaussians == 0 and config.steps else config


def _largest_groups(theta0: Tensor, layout: GaussianLayout, k: int = 3) -> str:
    peaks = {g: float(theta0[:, s].detach().abs().max()) for g, s in layout.slices.items() if s.stop > s.start}
    top = sorted(peaks.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{g} {v:.3g}" for g, v in top)


def check_initial_energy(energy0: Tensor, grad_norm0: Tensor, theta0: Tensor,
                         layout: GaussianLayout) -> None:
    """The inner energy and its gradient must be finite at ``theta0``.

    A non-finite ``E(theta0)`` would otherwise stop the solve after 0 steps with a stationarity
    of 0 (``NaN > tol`` is false), i.e. look like convergence. The views are validated before
    (NaN background, negative weights), so what is left is ``theta0`` itself: a render that
    overflows the dtype (e.g. log-scales whose ``exp(2 s)`` overflows, colours of 1e25).
    """
    bad = ~(torch.isfinite(energy0) & torch.isfinite(grad_norm0))
    if bool(bad.any()):
        scenes = torch.nonzero(bad).flatten().tolist()[:10]
        what = "energy" if not bool(torch.isfinite(energy0).all()) else "gradient of the energy"
        raise NonFiniteError(
            f"the inner {what} is NaN/Inf at theta0 in scene(s) {scenes}: the render of theta0 "
            f"overflows {theta0.dtype}. Largest |theta0| per group: {_largest_groups(theta0, layout)}")


def note_blind_scenes(energy0: Tensor, grad_norm0: Tensor, info) -> None:
    """Report scenes whose context renders do not depend on ``theta0``."""
    # E(theta0) = 1/2 |r|^2 > 0 with a zero gradient: the context renders do not depend on
    # theta0 at all (every Gaussian culled or outside the views, e.g. cameras looking down -z),
    # so theta* = theta0 and the gradients are the identity, which no stationarity test shows.
    blind = (grad_norm0 == 0) & (energy0 > 0)
    if bool(blind.any()):
        report("warn", f"no Gaussian of scene(s) {torch.nonzero(blind).flatten().tolist()[:10]} is "
               "visible in any context view (the gradient of the energy at theta0 is zero): theta* = "
               "theta0. Check the cameras: OpenCV camera-to-world, +z forward", info, NonFiniteError)


def report(policy: str, message: str, info, error: type) -> None:
    """Record ``message`` in ``info`` and raise, warn or do nothing per ``policy``."""
    if info is not None:
        info.messages.append(message)
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def note_constant_views(views, info) -> None:
    """The layer treats the context views as constants (it differentiates with respect to
    ``theta0`` and ``Lambda`` only); say so when some of them require grad."""
    if not torch.is_grad_enabled():
        return
    names = [n for n in ("images", "extrinsics", "intrinsics", "near", "far", "background", "weights")
             if isinstance(getattr(views, n), Tensor) and getattr(views, n).requires_grad]
    if names:
        report("warn", f"ContextViews.{', '.join(names)} require grad, but the layer treats the context "
               "views as constants: no gradient flows to them through theta*", info, DTypeError)


def safe_norm(x: Float[Tensor, "batch n"]) -> Float[Tensor, " batch"]:
    """Row norms ``||x_i||`` computed as ``m ||x_i / m||`` with ``m = max |x_i|``: no underflow of
    the squares (float32 norms below about 1e-22 otherwise come out as 0)."""
    peak = x.abs().amax(dim=1, keepdim=True)
    unit = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    return peak[:, 0] * unit.norm(dim=1)


def relative_residual(rhs: Float[Tensor, "batch n"],
                      residual: Float[Tensor, "batch n"]) -> tuple[Tensor, Tensor]:
    """``(||rhs||, ||residual|| / ||rhs||)`` per row, both without underflow; the ratio is 0 where
    ``rhs`` is 0 (its solution is exactly 0)."""
    peak = rhs.abs().amax(dim=1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    num, den = (residual / peak).norm(dim=1), (rhs / peak).norm(dim=1)
    rel = torch.where(den > 0, num / den.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(num))
    return peak[:, 0] * den, rel


class _Guard(torch.autograd.Function):
    """Identity in the forward; in the backward, rows (scenes) of the incoming gradient with a
    NaN/Inf are set to zero and reported, as the implicit backward does with its solve."""

    @staticmethod
    def forward(ctx, x: Tensor, guard: "UnrollGuard", name: str):  # type: ignore[override]
        ctx.guard, ctx.name = guard, name
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        finite = torch.isfinite(grad).all(1) if grad.ndim == 2 else torch.isfinite(grad).all().reshape(1)
        if not bool(finite.all()):
            keep = finite[:, None] if grad.ndim == 2 else finite
            grad = torch.where(keep, grad, torch.zeros_like(grad))
            cfg = ctx.guard.config
            report("warn" if cfg.on_failure == "fallback" else cfg.on_failure,
                   f"backward='unroll': the gradient with respect to {ctx.name} has NaN/Inf in "
                   f"{int((~finite).sum())} scene(s); their gradients were set to zero",
                   ctx.guard.info, NonFiniteError)
        return grad, None, None


class UnrollGuard:
    """The failure policy of the unrolled backward: wrap the inputs and ``theta*`` with it (the
    implicit backward zeroes and reports NaN/Inf gradients of its solve; this does the same for
    the cotangent of ``theta*`` and the gradients that reach ``theta0`` and ``Lambda``)."""

    def __init__(self, config, info=None):
        self.config, self.info = config, info

    def __call__(self, x: Tensor, name: str) -> Tensor:
        return _Guard.apply(x, self, name) if x.requires_grad else x


__all__ = ["SUPPORTED_DTYPES", "UnrollGuard", "check_initial_energy", "check_parameters",
           "note_blind_scenes", "note_constant_views", "relative_residual", "report", "safe_norm", "skip_solve_if_empty"]
