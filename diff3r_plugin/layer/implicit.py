"""The implicit backward of the layer: the Implicit Function Theorem at ``theta*``.

At a stationary point of the inner energy, ``J^T r + Lambda (theta* - theta0) = 0``. Its
derivative with respect to ``theta0`` and ``Lambda`` gives, with ``H`` the Hessian of the
energy at ``theta*`` (Gauss-Newton ``J^T W J + diag(Lambda)``, or the exact Hessian)::

    solve H v = dL/dtheta*        (matrix-free PCG with the HessianOperator's preconditioner)
    dL/dtheta0  = Lambda * v
    dL/dLambda  = -(theta* - theta0) * v

The gradient is exact only at a stationary point; ``info.stationarity`` and the true PCG
residual ``info.pcg_rel_residual`` say how far from that a given solve is.
"""

import time

import torch
from jaxtyping import Float
from torch import Tensor

from ..config import Diff3RConfig
from ..errors import PCGNotConvergedError
from ..profiling import part
from .checks import relative_residual, report
from .diagnostics import Diff3RInfo
from .hessian import HessianOperator
from .objective import Objective
from .pcg import pcg


def implicit_solve(obj: Objective, config: Diff3RConfig, info: Diff3RInfo,
                   theta_star: Float[Tensor, "batch param"], theta0: Float[Tensor, "batch param"],
                   lam: Float[Tensor, "batch param"], grad: Float[Tensor, "batch param"],
                   x0: Float[Tensor, "batch param"] | None = None,
                   operator: HessianOperator | None = None) -> Float[Tensor, "batch param"]:
    """Solve ``H v = grad`` per scene at ``theta_star`` (from ``x0`` if given) and record the
    solve in ``info.backward_record``.

    ``operator``: an undamped operator already built at ``theta_star`` (the LM forward's last
    one), used when its products are those the backward needs (``sparse``, Gauss-Newton).
    """
    t0 = time.perf_counter()
    record = info.backward_record
    with torch.inference_mode(False), torch.enable_grad():
        grad = grad.detach()
        reuse = (operator is not None and operator.damping is None and config.hessian == "gauss_newton"
                 and operator.product == config.resolved(obj.backend).matvec)
        op = operator if reuse else HessianOperator(
            obj, theta_star.detach(), theta0.detach(), lam.detach(), config,
            generator=torch.Generator(device="cpu").manual_seed(0))
        op.num_matvecs = 0
        precond = op.preconditioner()
        with part("implicit_backward"):
            v, res = pcg(op, grad, precond=precond, x0=x0, tol=config.pcg_tol,
                         maxiter=config.pcg_maxiter, check_every=config.pcg_check_every)
            # The true residual of the returned solution (PCG's recursion can drift from it).
            idx = torch.arange(grad.shape[0], device=grad.device)
            # Scaled by the max-abs entry first: a float32 cotangent of 1e-30 has a norm too.
            gnorm, true_rel = relative_residual(grad, grad - op(v, idx))
    record.product, record.precond = op.product, op.precond
    record.pcg_iters = res.iterations
    record.warm_started = x0 is not None
    record.pcg_rel_residual = true_rel.detach()
    # The truth: converged means the true residual is within the tolerance asked for.
    record.pcg_converged = (true_rel <= config.pcg_tol) & torch.isfinite(true_rel)
    record.pcg_indefinite = res.indefinite
    record.rhs_norm = gnorm
    record.num_matvecs = op.num_matvecs
    finite = torch.isfinite(v).all(1)
    if not bool(finite.all()):
        v = torch.where(finite[:, None], v, torch.zeros_like(v))
        report("warn" if config.on_failure == "fallback" else config.on_failure,
               f"implicit solve produced NaN/Inf for {int((~finite).sum())} scene(s); their "
               "gradients were set to zero", info, PCGNotConvergedError)
    if not bool(record.pcg_converged.all()):
        worst = float(true_rel.max())
        report(config.on_failure,
               f"PCG did not converge for {int((~record.pcg_converged).sum())} scene(s) "
               f"(worst relative residual {worst:.2e} > tol {config.pcg_tol:.1e} after "
               f"{int(res.iterations.max())} iterations); the implicit gradient is approximate",
               info, PCGNotConvergedError)
    record.implicit_solution = v.detach()
    record.backward_ms = (time.perf_counter() - t0) * 1e3
    return v


class ImplicitFunction(torch.autograd.Function):
    """Identity on ``theta*`` in the forward; the IFT solve in the backward."""

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
                           lam, grad_out, x0=state.get("warm_start"), operator=state.get("operator"))
        grad_theta0 = lam * v if ctx.needs_input_grad[0] else None
        grad_lam = -(theta_star - theta0) * v if ctx.needs_input_grad[1] else None
        return grad_theta0, grad_lam, None, None
