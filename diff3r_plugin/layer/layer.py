"""The Diff3R optimization layer: forward orchestration.

Forward (test-time optimization on the context views)::

    theta* = argmin_theta 1/2 ||r(theta)||^2 + 1/2 (theta - theta0)^T diag(Lambda) (theta - theta0)

by the inner solver of :mod:`.inner` (Adam, or Levenberg-Marquardt with the
:class:`.hessian.HessianOperator`). Backward: ``backward="implicit"`` solves the Implicit
Function Theorem system with the same operator at ``theta*`` (:mod:`.implicit`);
``backward="unroll"`` differentiates through the K steps (the reference).

**Warning.** The implicit gradient is exact only if the inner solve reached a stationary
point (and, with the Gauss-Newton ``H``, if the context residuals are small there, or with
``hessian="exact"``). ``info.stationarity`` and the PCG residual tell how far from that a
given solve is; ``backward="unroll"`` is the reference.

The layer never modifies its inputs, does its own grad-enabled work on clones (so it runs
inside ``torch.inference_mode()``, e.g. a Lightning test step), and keeps no state between
calls (safe under DDP).
"""

import time
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..config import Diff3RConfig
from ..errors import InvalidLambdaError, LayoutMismatchError, NonFiniteError, SolverDivergedError
from ..gaussians.layout import GROUPS, GaussianLayout, GaussianParams
from . import checks
from ..profiling import part
from .diagnostics import Diff3RInfo, gradient_breakdown, scene_extent
from .implicit import ImplicitFunction, report
from .inner import adam_solve, lm_solve
from .objective import Objective
from .probe import plan_changes
from .views import ContextViews


def check_lambda(lam: Tensor, layout: GaussianLayout) -> None:
    """Lambda must be finite and strictly positive; name the first offending group."""
    bad = ~torch.isfinite(lam) | (lam <= 0)
    if bool(bad.any()):
        first = int(torch.nonzero(bad.any(0))[0])
        group = next(g for g, s in layout.slices.items() if s.start <= first < s.stop)
        kind = "NaN/Inf" if not bool(torch.isfinite(lam).all()) else "non-positive"
        raise InvalidLambdaError(
            f"Lambda has {int(bad.sum())} {kind} entr{'y' if int(bad.sum()) == 1 else 'ies'} "
            f"(first in group {group!r}); the proximal weights must be finite and > 0 "
            "(use a softplus with a floor, e.g. diff3r_plugin.uncertainty.UncertaintyHead)")


def learning_rates(config: Diff3RConfig, layout: GaussianLayout, theta0: Tensor) -> Tensor:
    rates = {g: getattr(config.lr, g) for g in GROUPS}
    lr = layout.per_group(rates, batch=theta0.shape[0], dtype=theta0.dtype, device=theta0.device)
    if config.means_lr_scale == "scene_extent" and layout.num_gaussians > 0:
        means = layout.split(theta0)["means"]
        ext = scene_extent(means.detach())
        s = layout.slices["means"]
        lr[:, s] = lr[:, s] * ext[:, None]
    return lr


def _visibility_staleness(obj: Objective, theta_star: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs and reordered pixels between the frozen pair lists (``theta0``) and ``theta*``'s."""
    frozen = obj.make_plan(theta_star)
    current = replace(obj, visibility_theta=None).make_plan(theta_star)
    h, w = obj.views.image_shape
    return plan_changes(frozen, current, theta_star.shape[0], obj.views.num_views * h * w)


def diff3r_layer(theta0: Float[Tensor, "batch param"], lam: Float[Tensor, "batch param"], views: ContextViews | None,
                 layout: GaussianLayout, config: Diff3RConfig | None = None, *, backend: str | None = None,
                 warm_start: Float[Tensor, "batch param"] | None = None
                 ) -> tuple[Float[Tensor, "batch param"], Diff3RInfo]:
    """Functional form of :class:`Diff3RLayer` on flat ``[b, n]`` parameter vectors.

    ``backend`` (default ``config.backend``) is the renderer of the inner objective; the
    settings actually used are ``config.resolved(backend)`` (reported in ``info.matvec``,
    ``info.precond`` and ``info.messages``).

    ``warm_start`` (``[b, n]``, optional) is the initial guess of the implicit backward's PCG,
    typically ``info.implicit_solution`` of an earlier call on the same scenes with a similar
    outer loss (per-scene fine-tuning, repeated evaluation); the unrolled backward ignores it.

    Bad input raises a typed error naming it (:mod:`.checks`, ``ContextViews.validate``):
    ``theta0``, ``lam`` and ``warm_start`` must share one dtype, float32 or float64 (mixed
    dtypes are a ``DTypeError``, not promoted; the views are cast to ``theta0``'s dtype), and a
    zero quaternion is a ``ValueRangeError``. A scene without Gaussians gives ``theta* =
    theta0``; NaN/Inf gradients are zeroed per scene and reported under ``on_failure`` in both
    backward modes.
    """
    config = config or Diff3RConfig()
    backend = backend or config.backend
    notes = config.resolution_notes(backend)
    config = config.resolved(backend)
    if views is None:
        raise LayoutMismatchError("views are missing: the layer needs the context images and cameras")
    views.validate()
    checks.check_parameters(theta0, lam, layout, warm_start)
    for name, t in (("theta0", theta0), ("lam", lam)):
        layout.check_vector(t, name)
    if theta0.shape != lam.shape:
        raise LayoutMismatchError(f"theta0 {tuple(theta0.shape)} and lam {tuple(lam.shape)} differ")
    if theta0.shape[0] != views.batch:
        raise LayoutMismatchError(f"theta0 has batch {theta0.shape[0]} but the views have batch {views.batch}")
    if layout.num_pose_views > views.num_views - 1:
        raise LayoutMismatchError(
            f"the layout has {layout.num_pose_views} pose deltas but only {views.num_views} context views")
    if not bool(torch.isfinite(theta0).all()):
        raise NonFiniteError(f"theta0 contains {int((~torch.isfinite(theta0)).sum())} NaN/Inf value(s)")
    check_lambda(lam.detach(), layout)
    if warm_start is not None:
        layout.check_vector(warm_start, "warm_start")
        if warm_start.shape != theta0.shape:
            raise LayoutMismatchError(
                f"warm_start {tuple(warm_start.shape)} and theta0 {tuple(theta0.shape)} differ")
        if not bool(torch.isfinite(warm_start).all()):
            raise NonFiniteError(
                f"warm_start contains {int((~torch.isfinite(warm_start)).sum())} NaN/Inf value(s)")

    config = checks.skip_solve_if_empty(config, layout)
    inference = torch.is_inference_mode_enabled()
    wants_grad = (not inference) and torch.is_grad_enabled() and (theta0.requires_grad or lam.requires_grad)
    unroll = wants_grad and config.backward == "unroll"
    t_start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad(), part("tto_forward"):
        obj = Objective.for_layer(views, layout, config, theta0, backend)
        if unroll:
            guard = checks.UnrollGuard(config)
            t0_in, lam_in = guard(theta0, "theta0"), guard(lam, "lam")
        else:
            t0_in, lam_in = theta0.detach().clone(), lam.detach().clone()
        if config.steps == 0:
            res = None
            theta_star = t0_in.clone() if unroll else t0_in
        elif config.inner_solver == "adam":
            lr = learning_rates(config, layout, t0_in.detach())
            res = adam_solve(obj, t0_in, lam_in, lr, config.steps, tol=config.stationarity_tol,
                             create_graph=unroll, progress=config.progress)
        else:
            res = lm_solve(obj, t0_in, lam_in, config, create_graph=unroll,
                           generator=torch.Generator().manual_seed(0))
    if res is not None:
        checks.check_initial_energy(res.energy0, res.grad_norm0, theta0, layout)
    info = _forward_record(config, obj, res, theta0, theta_star if res is None else res.theta, layout,
                           notes, t_start)
    if res is not None:
        checks.note_blind_scenes(res.energy0, res.grad_norm0, info)
    checks.note_constant_views(views, info)
    if res is not None and bool((res.nan_rollbacks > 0).any()):
        report(config.on_failure,
               f"the inner optimization produced NaN/Inf in {int((res.nan_rollbacks > 0).sum())} "
               "scene(s); they were rolled back to their last finite iterate", info, SolverDivergedError)

    if unroll:
        guard.info = info
        return guard(theta_star if res is None else res.theta, "theta*"), info
    if res is None:
        # No inner step: theta* = theta0, whose derivative is the identity (and zero for Lambda).
        return (theta0.clone() if wants_grad else theta0.detach().clone()), info
    theta_star = res.theta.detach()
    if wants_grad:
        state = {"objective": obj, "config": config, "info": info, "operator": res.operator,
                 "warm_start": None if warm_start is None else warm_start.detach().to(theta0.dtype).clone()}
        theta_star = ImplicitFunction.apply(theta0, lam, theta_star, state)
    return theta_star, info


def _forward_record(config: Diff3RConfig, obj: Objective, res, theta0: Tensor, theta_star: Tensor,
                    layout: GaussianLayout, notes: list[str], t_start: float) -> Diff3RInfo:
    """The frozen record of one forward (``res`` None: no inner step) begun at ``t_start``."""
    b = theta0.shape[0]
    device = theta0.device
    common = dict(inner_solver=config.inner_solver, backward=config.backward, matvec=config.matvec,
                  hessian=config.hessian, precond=config.precond, visibility=config.visibility,
                  messages=list(notes))
    if res is None:
        zeros = torch.zeros(b, device=device)
        steps = torch.zeros(b, dtype=torch.long, device=device)
        return Diff3RInfo(**common, inner_steps=steps, stationarity=zeros.clone(), initial_energy=zeros.clone(),
                          final_energy=zeros.clone(), nan_rollbacks=steps.clone(),
                          forward_ms=(time.perf_counter() - t_start) * 1e3)
    stat = res.grad_norm / res.grad_norm0.clamp_min(torch.finfo(res.grad_norm.dtype).tiny)
    stat = torch.where(res.grad_norm0 > 0, stat, torch.zeros_like(stat))
    extra: dict = {}
    if res.grad is not None:
        extra["final_grad"] = res.grad
        extra["stationarity_groups"], extra["grad_share_top1pct"] = gradient_breakdown(
            res.grad, res.grad_norm0, layout)
    if obj.visibility_theta is not None:
        extra["stale_pairs"], extra["stale_order_pixels"] = _visibility_staleness(obj, theta_star.detach())
    return Diff3RInfo(**common, inner_steps=res.steps, stationarity=stat.detach(), initial_energy=res.energy0,
                      final_energy=res.energy, nan_rollbacks=res.nan_rollbacks,
                      forward_ms=(time.perf_counter() - t_start) * 1e3, **extra)


class Diff3RLayer(nn.Module):
    """Differentiable test-time optimization of Gaussians on the context views.

    Example::

        layer = Diff3RLayer(Diff3RConfig(steps=20, inner_solver="lm"))
        theta_star, info = layer(theta0, lam, views)   # GaussianParams or flat [b, n] + layout
        loss = render_loss(theta_star, target_views)
        loss.backward()                                 # IFT + PCG
        print(info.summary())
    """

    def __init__(self, config: Diff3RConfig | None = None, **overrides):
        super().__init__()
        config = config or Diff3RConfig()
        if overrides:
            config = config.merge(overrides)
        self.config = config

    def forward(self, theta0: Float[Tensor, "batch param"] | GaussianParams,
                lam: Float[Tensor, "batch param"] | GaussianParams, views: ContextViews | None,
                layout: GaussianLayout | None = None, warm_start: Float[Tensor, "batch param"] | None = None
                ) -> tuple[Float[Tensor, "batch param"] | GaussianParams, Diff3RInfo]:
        """``warm_start``: optional flat ``[b, n]`` initial guess of the implicit backward's PCG
        (e.g. ``info.implicit_solution`` of an earlier call on the same scenes)."""
        if isinstance(theta0, GaussianParams):
            layout = theta0.layout
            flat0 = theta0.flatten()
            if isinstance(lam, GaussianParams) and lam.layout != layout:
                raise LayoutMismatchError(f"lam has layout {lam.layout} but theta0's is {layout}")
            flat_lam = lam.flatten() if isinstance(lam, GaussianParams) else lam
            flat, info = diff3r_layer(flat0, flat_lam, views, layout, self.config, warm_start=warm_start)
            return GaussianParams.unflatten(flat, layout), info
        if layout is None:
            raise LayoutMismatchError("pass the GaussianLayout with flat parameter vectors")
        if isinstance(lam, GaussianParams):
            if lam.layout != layout:
                raise LayoutMismatchError(f"lam has layout {lam.layout} but theta0's is {layout}")
            lam = lam.flatten()
        return diff3r_layer(theta0, lam, views, layout, self.config, warm_start=warm_start)
