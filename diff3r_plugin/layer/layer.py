"""The Diff3R optimization layer.

Forward (test-time optimization on the context views)::

    theta* = argmin_theta 1/2 ||r(theta)||^2 + 1/2 (theta - theta0)^T diag(Lambda) (theta - theta0)

Backward (``backward="implicit"``), by the Implicit Function Theorem at the stationary point
``J^T r + Lambda (theta* - theta0) = 0`` with ``H = J^T J + diag(Lambda)``::

    solve H v = dL/dtheta*        (matrix-free PCG, Jacobi preconditioner diag(J^T J) + Lambda)
    dL/dtheta0 = Lambda * v
    dL/dLambda = -(theta* - theta0) * v

**Warning.** The implicit gradient is exact only if the inner solve reached a stationary
point (and, with the Gauss-Newton ``H``, if the context residuals are small there, or with
``hessian="exact"``). ``info.stationarity`` and the PCG residual tell how far from that a
given solve is; ``backward="unroll"`` (autograd through the K steps) is the reference.

The layer never modifies its inputs, does its own grad-enabled work on clones (so it runs
inside ``torch.inference_mode()``, e.g. a Lightning test step), and keeps no state between
calls (safe under DDP).
"""

import time
import warnings
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..config import Diff3RConfig
from ..errors import (InvalidLambdaError, LayoutMismatchError, NonFiniteError, PCGNotConvergedError,
                      SolverDivergedError)
from ..gaussians.layout import GROUPS, GaussianLayout, GaussianParams
from ..profiling import part
from . import checks
from .diagnostics import Diff3RInfo, gradient_breakdown, scene_extent
from .inner import adam_solve, lm_solve
from .matvec import make_matvec
from .objective import Objective
from .pcg import pcg
from .probe import plan_changes
from .views import ContextViews


def _report(policy: str, message: str, info: Diff3RInfo, error: type) -> None:
    info.messages.append(message)
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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


class _Implicit(torch.autograd.Function):
    """Identity on ``theta*`` in the forward; IFT + PCG in the backward."""

    @staticmethod
    def forward(ctx, theta0: Tensor, lam: Tensor, theta_star: Tensor, state: dict):  # type: ignore[override]
        ctx.state = state
        ctx.save_for_backward(theta0, lam, theta_star)
        return theta_star.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        theta0, lam, theta_star = ctx.saved_tensors
        state = ctx.state
        v = implicit_solve(state["objective"], state["config"], state["info"], theta_star, theta0,
                           lam, grad_out, x0=state.get("warm_start"))
        grad_theta0 = lam * v if ctx.needs_input_grad[0] else None
        grad_lam = -(theta_star - theta0) * v if ctx.needs_input_grad[1] else None
        return grad_theta0, grad_lam, None, None


def effective_matvec(config: Diff3RConfig, backend: str) -> str:
    """The matvec actually used: renderers other than the torch one only have a first-order
    backward, so they always use finite-difference products."""
    return config.matvec if backend == "torch" else "finite_difference"


def effective_precond(config: Diff3RConfig, backend: str) -> str:
    """Block-Jacobi needs the explicit Jacobian (``matvec="sparse"``); otherwise the
    (estimated) diagonal Jacobi preconditioner is used."""
    if config.precond == "block_jacobi" and (config.hessian != "gauss_newton"
                                              or effective_matvec(config, backend) != "sparse"):
        return "jacobi"
    return config.precond


def implicit_solve(obj: Objective, config: Diff3RConfig, info: Diff3RInfo, theta_star: Tensor,
                   theta0: Tensor, lam: Tensor, grad: Tensor, x0: Tensor | None = None) -> Tensor:
    """Solve ``H v = grad`` per scene (from ``x0`` if given) and record the solve in ``info``."""
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        grad = grad.detach()
        with part("linearize"):
            mv = make_matvec(effective_matvec(config, obj.backend), config.hessian, obj,
                             theta_star.detach(), theta0.detach(), lam.detach(), config.fd_eps)
            precond = None
            if config.precond == "block_jacobi" and hasattr(mv, "block_preconditioner"):
                precond = mv.block_preconditioner(lam.detach())
            elif config.precond != "none":
                gen = torch.Generator(device="cpu").manual_seed(0)
                precond = mv.jtj_diag(config.precond_probes, gen) + lam.detach()
        with part("implicit_backward"):
            v, res = pcg(mv, grad, precond=precond, x0=x0, tol=config.pcg_tol, maxiter=config.pcg_maxiter,
                         check_every=config.pcg_check_every)
            # True residual of the returned solution (PCG's recursion can drift from it).
            idx = torch.arange(grad.shape[0], device=grad.device)
            gnorm, true_rel = checks.relative_residual(grad, grad - mv(v, idx))
    info.pcg_iters = res.iterations
    info.warm_started = x0 is not None
    info.pcg_rel_residual = true_rel.detach()
    info.pcg_converged = (true_rel <= max(config.pcg_tol * 1.5, config.pcg_tol + 1e-6)) & torch.isfinite(true_rel)
    info.pcg_indefinite = res.indefinite
    info.rhs_norm = gnorm
    info.num_matvecs = mv.num_matvecs
    finite = torch.isfinite(v).all(1)
    if not bool(finite.all()):
        v = torch.where(finite[:, None], v, torch.zeros_like(v))
        _report("warn" if config.on_failure == "fallback" else config.on_failure,
                f"implicit solve produced NaN/Inf for {int((~finite).sum())} scene(s); their "
                "gradients were set to zero", info, PCGNotConvergedError)
    if not bool(info.pcg_converged.all()):
        worst = float(true_rel.max())
        _report(config.on_failure,
                f"PCG did not converge for {int((~info.pcg_converged).sum())} scene(s) "
                f"(worst relative residual {worst:.2e} > tol {config.pcg_tol:.1e} after "
                f"{int(res.iterations.max())} iterations); the implicit gradient is approximate",
                info, PCGNotConvergedError)
    info.implicit_solution = v.detach()
    info.backward_ms = (time.perf_counter() - t0) * 1e3
    return v


def _visibility_staleness(obj: Objective, theta_star: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs and reordered pixels between the frozen pair lists (``theta0``) and ``theta*``'s."""
    frozen = obj.make_plan(theta_star)
    current = replace(obj, visibility_theta=None).make_plan(theta_star)
    h, w = obj.views.image_shape
    return plan_changes(frozen, current, theta_star.shape[0], obj.views.num_views * h * w)


def diff3r_layer(theta0: Tensor, lam: Tensor, views: ContextViews, layout: GaussianLayout,
                 config: Diff3RConfig | None = None, *, backend: str | None = None,
                 warm_start: Tensor | None = None) -> tuple[Tensor, Diff3RInfo]:
    """Functional form of :class:`Diff3RLayer` on flat ``[b, n]`` parameter vectors.

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
            res = lm_solve(obj, t0_in, lam_in, config.steps, damping=config.lm_damping,
                           tol=config.stationarity_tol, pcg_iters=config.lm_pcg_iters,
                           pcg_tol=config.lm_pcg_tol, precond=effective_precond(config, obj.backend),
                           precond_probes=config.precond_probes,
                           matvec=effective_matvec(config, obj.backend),
                           fd_eps=config.fd_eps, create_graph=unroll, progress=config.progress,
                           generator=torch.Generator().manual_seed(0))
    b = theta0.shape[0]
    device = theta0.device
    zeros = torch.zeros(b, device=device)
    used_matvec = effective_matvec(config, obj.backend)
    used_precond = effective_precond(config, obj.backend)
    if res is None:
        info = Diff3RInfo(config.inner_solver, config.backward, used_matvec, config.hessian,
                          used_precond, torch.zeros(b, dtype=torch.long, device=device), zeros.clone(),
                          zeros.clone(), zeros.clone(), torch.zeros(b, dtype=torch.long, device=device))
    else:
        checks.check_initial_energy(res.energy0, res.grad_norm0, theta0, layout)
        theta_star = res.theta
        stat = res.grad_norm / res.grad_norm0.clamp_min(torch.finfo(res.grad_norm.dtype).tiny)
        stat = torch.where(res.grad_norm0 > 0, stat, torch.zeros_like(stat))
        info = Diff3RInfo(config.inner_solver, config.backward, used_matvec, config.hessian,
                          used_precond, res.steps, stat.detach(), res.energy0, res.energy,
                          res.nan_rollbacks)
        checks.note_blind_scenes(res.energy0, res.grad_norm0, info)
        if res.grad is not None:
            info.final_grad = res.grad
            info.stationarity_groups, info.grad_share_top1pct = gradient_breakdown(
                res.grad, res.grad_norm0, layout)
        if obj.visibility_theta is not None:
            info.stale_pairs, info.stale_order_pixels = _visibility_staleness(obj, theta_star.detach())
        if bool((res.nan_rollbacks > 0).any()):
            _report(config.on_failure,
                    f"the inner optimization produced NaN/Inf in {int((res.nan_rollbacks > 0).sum())} "
                    "scene(s); they were rolled back to their last finite iterate", info,
                    SolverDivergedError)
    info.visibility = config.visibility
    checks.note_constant_views(views, info)
    info.forward_ms = (time.perf_counter() - t_start) * 1e3

    if unroll:
        guard.info = info
        return guard(theta_star, "theta*"), info
    if res is None:
        # No inner step: theta* = theta0, whose derivative is the identity (and zero for Lambda).
        return (theta0.clone() if wants_grad else theta0.detach().clone()), info
    theta_star = theta_star.detach()
    if wants_grad:
        state = {"objective": obj, "config": config, "info": info,
                 "warm_start": None if warm_start is None else warm_start.detach().to(theta0.dtype).clone()}
        theta_star = _Implicit.apply(theta0, lam, theta_star, state)
    return theta_star, info


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

    def forward(self, theta0, lam, views: ContextViews, layout: GaussianLayout | None = None,
                warm_start: Tensor | None = None):
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
