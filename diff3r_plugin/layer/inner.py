"""Inner (test-time) solvers: Adam with per-group rates, and Levenberg-Marquardt with PCG.

Both work per scene: a scene whose iterate turns non-finite is rolled back to its last finite
iterate and frozen (counted in ``nan_rollbacks``); a scene that reaches the stationarity
tolerance stops moving. With ``create_graph=True`` every step stays on the autograd graph (the
``unroll`` reference backward); memory then grows with the number of steps.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Diff3RConfig
from .hessian import HessianOperator
from .objective import Objective
from .pcg import pcg


@dataclass
class InnerResult:
    theta: Tensor
    steps: Tensor  # [b]
    grad_norm0: Tensor  # [b]
    grad_norm: Tensor  # [b]
    energy0: Tensor
    energy: Tensor
    nan_rollbacks: Tensor
    grad: Tensor | None = None  # [b, n] detached gradient of E at ``theta`` (where the solve ended)
    operator: "HessianOperator | None" = None  # the undamped operator at ``theta`` (sparse LM), for the backward


# Requested Adam iterates, keyed by step count (see ``record_iterates``).
_RECORD: ContextVar["tuple[frozenset[int], dict[int, Tensor]] | None"] = ContextVar(
    "diff3r_record_iterates", default=None)


@contextmanager
def record_iterates(steps):
    """Keep the Adam iterates ``theta_s`` for each ``s`` in ``steps`` of the solves inside.

    Adam's iterate after ``s`` steps does not depend on how many steps follow (no schedule over
    the horizon; a scene that stops early keeps its last iterate), so one ``max(steps)``-step
    solve gives every point of a PSNR-vs-TTO-steps curve that separate ``s``-step solves would.
    Yields a dict ``{s: theta_s}`` (detached ``[b, n]``, the layer's flat vectors), filled by the
    last Adam solve run inside the block; ``s = 0`` is ``theta0``.
    """
    store: dict[int, Tensor] = {}
    token = _RECORD.set((frozenset(int(s) for s in steps), store))
    try:
        yield store
    finally:
        _RECORD.reset(token)


def _energy_and_grad(obj: Objective, theta: Tensor, theta0: Tensor, lam: Tensor, sqrt_w,
                     create_graph: bool):
    if not create_graph or not theta.requires_grad:
        # Without the unrolled graph each iterate is a fresh leaf: a candidate built from the
        # previous leaf would otherwise chain every step's update on the autograd graph, and
        # memory would grow with the number of TTO steps.
        theta = theta.detach().requires_grad_(True)
    e = obj.energy(theta, theta0, lam, sqrt_w=sqrt_w)
    g = torch.autograd.grad(e.sum(), theta, create_graph=create_graph)[0]
    if not create_graph:
        # The energy's graph holds the renderer's pair lists (kept by its autograd nodes
        # beyond the backward); a kept energy would keep every step's lists alive.
        e = e.detach()
    return theta, e, g


def _finite_rows(*ts: Tensor) -> Tensor:
    ok = None
    for t in ts:
        f = torch.isfinite(t.detach())
        f = f.all(1) if f.ndim > 1 else f
        ok = f if ok is None else ok & f
    return ok


def adam_solve(obj: Objective, theta0: Tensor, lam: Tensor, lr: Tensor, steps: int, *,
               tol: float = 0.0, create_graph: bool = False, progress: bool = False,
               betas=(0.9, 0.999), eps: float = 1e-15) -> InnerResult:
    """``steps`` Adam iterations on ``E`` with per-entry learning rates ``lr`` ``[b, n]``."""
    b = theta0.shape[0]
    theta = theta0 if create_graph else theta0.detach().clone()
    # Moments and the update in float64: with 3DGS's eps = 1e-15, d(m / (sqrt(v) + eps))/dv
    # ~ 1/g^2 overflows float32 for entries with tiny but non-zero gradients, which turns the
    # unrolled backward into inf * 0 = NaN.
    m = torch.zeros_like(theta0, dtype=torch.float64)
    v = torch.zeros_like(theta0, dtype=torch.float64)
    lr = lr.double()
    moving = torch.ones(b, dtype=torch.bool, device=theta0.device)
    taken = torch.zeros(b, dtype=torch.long, device=theta0.device)
    rollbacks = torch.zeros(b, dtype=torch.long, device=theta0.device)
    sqrt_w = obj.pixel_weights(theta0.detach())
    theta, e0, g = _energy_and_grad(obj, theta, theta0, lam, sqrt_w, create_graph)
    g0 = g.detach().norm(dim=1)
    e, gn = e0, g0
    record = _RECORD.get()
    if record is not None:
        record[1].clear()
        if 0 in record[0]:
            record[1][0] = theta.detach().clone()
    for k in tqdm(range(steps), disable=not progress, desc="TTO (adam)", leave=False):
        if tol > 0:
            moving = moving & (gn > tol * g0)
        if not bool(moving.any()):
            break
        b1, b2 = betas
        g64 = g.double()
        m = b1 * m + (1 - b1) * g64
        v = b2 * v + (1 - b2) * g64 * g64
        mhat = m / (1 - b1 ** (k + 1))
        vhat = v / (1 - b2 ** (k + 1))
        # Entries whose gradient has been exactly zero so far (v = 0, hence m = 0: Gaussians no
        # context view sees) take an explicit zero step. Through lr * m / (sqrt(v) + eps) the
        # unrolled backward would multiply their adjoint by ~ lr * Lambda / eps ~ 1e11 per step
        # (via g = Lambda (theta - theta0)) and overflow to inf/NaN within a few steps when the
        # outer loss sees them; the dropped term is zero in exact arithmetic, the forward is
        # unchanged. The inner where keeps sqrt's infinite derivative at v = 0 out of the backward.
        pos = vhat > 0
        root = torch.where(pos, vhat, torch.ones_like(vhat)).sqrt()
        step = torch.where(pos, lr * mhat / (root + eps), torch.zeros_like(mhat)).to(theta.dtype)
        candidate = theta - step * moving[:, None].to(theta)
        cand, e_new, g_new = _energy_and_grad(obj, candidate, theta0, lam, sqrt_w, create_graph)
        ok = _finite_rows(cand, e_new, g_new)
        rollbacks = rollbacks + (~ok & moving).long()
        moving = moving & ok
        keep = ok[:, None]
        theta = torch.where(keep, cand, theta)
        if not create_graph:  # no chain of iterates on the graph (see _energy_and_grad)
            theta = theta.detach()
        g = torch.where(keep, g_new, g)
        e = torch.where(ok, e_new, e)
        taken = taken + moving.long()
        gn = g.detach().norm(dim=1)
        if record is not None and k + 1 in record[0]:
            record[1][k + 1] = theta.detach().clone()
    if record is not None:  # a solve that stopped early: the later iterates are its last one
        for s in record[0]:
            if s <= steps and s not in record[1]:
                record[1][s] = theta.detach().clone()
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks, g.detach())


def lm_solve(obj: Objective, theta0: Float[Tensor, "batch param"], lam: Float[Tensor, "batch param"],
             config: Diff3RConfig, *, create_graph: bool = False,
             generator: torch.Generator | None = None) -> InnerResult:
    """``config.steps`` Levenberg-Marquardt steps on ``E``: each solves
    ``(J^T J + Lambda + mu D) delta = -grad E`` with PCG, ``D = diag(J^T J) + Lambda``, and
    accepts it where the energy decreases (``mu /= 3``), else grows ``mu`` (``* 4``).

    Every step solves with the :class:`.hessian.HessianOperator` at the current iterate
    (damped by ``mu``); its products and preconditioner follow ``config.resolved(backend)``.
    With ``matvec="sparse"`` (torch backend) the operator's explicit Jacobian also gives the
    energy and the gradient ``J^T r + Lambda (theta - theta0)`` of each candidate, so an
    accepted candidate's linearization is the next step's operator; a rejected step retries at
    the same linearization with a larger ``mu``. Other products pass through the renderer and
    estimate ``D``.

    With ``create_graph=True`` (the unrolled reference) every step stays on the autograd graph:
    each step's linear solve is differentiated exactly, by an adjoint solve with the same
    matrix (:class:`_SolveDerivative`; memory: one linearization per step). The damping ``mu``,
    the scaling ``D`` and the preconditioner are constants of each step.
    """
    b = theta0.shape[0]
    device = theta0.device
    steps, tol = config.steps, config.stationarity_tol
    sparse = config.resolved(obj.backend).matvec == "sparse"
    sqrt_w = obj.pixel_weights(theta0.detach())
    # The adjoint tolerance is what the dtype can reach (float32 PCG stalls near 1e-6).
    adjoint_tol = 1e-5 if theta0.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10

    def operator(t: Tensor) -> HessianOperator:
        return HessianOperator(obj, t, theta0, lam, config, hessian="gauss_newton", generator=generator,
                               create_graph=create_graph)

    def point(t: Tensor):
        """``(t, E(t), grad E(t), operator at t or None)``."""
        if not sparse:
            return (*_energy_and_grad(obj, t, theta0, lam, sqrt_w, create_graph), None)
        t = t if create_graph else t.detach()
        op = operator(t)
        with torch.set_grad_enabled(create_graph):
            r = op.jacobian.residual
            d = t - theta0
            e = 0.5 * (r * r).sum(1) + 0.5 * (lam * d * d).sum(1)
            g = op.jacobian.vjp(r) + lam * d
        return t, e, g, op

    theta = theta0 if create_graph else theta0.detach().clone()
    mu = torch.full((b,), config.lm_damping, dtype=theta0.dtype, device=device)
    taken = torch.zeros(b, dtype=torch.long, device=device)
    rollbacks = torch.zeros(b, dtype=torch.long, device=device)
    moving = torch.ones(b, dtype=torch.bool, device=device)
    theta, e0, g, op = point(theta)
    g0 = g.detach().norm(dim=1)
    e, gn = e0, g0
    for _ in tqdm(range(steps), disable=not config.progress, desc="TTO (lm)", leave=False):
        moving = moving & (gn > tol * g0)
        if not bool(moving.any()):
            break
        if op is None:
            op = operator(theta)
        a = op.damped(mu)
        with torch.no_grad():
            delta, _ = pcg(a, -g.detach(), precond=a.preconditioner(), tol=config.lm_pcg_tol,
                           maxiter=config.lm_pcg_iters, check_every=config.pcg_check_every)
        if create_graph:
            # The step as a differentiable function of theta: delta = A(theta)^-1 (-g(theta)).
            # Its value is the PCG step actually taken (so the trajectory is the implicit run's),
            # its derivative that of the exact solve, -A^-1 (dg + dA delta), from one adjoint
            # solve with the same A: the graph holds one linearization per step instead of
            # every PCG iteration.
            def solve(rhs, a=a):
                return pcg(a, rhs, precond=a.preconditioner(), tol=adjoint_tol,
                           maxiter=max(10 * config.lm_pcg_iters, 500))[0]

            delta = delta + _SolveDerivative.apply(-g - a.graph_apply(delta, lam), solve)
        delta = delta * moving[:, None].to(delta)
        cand, e_new, g_new, op_new = point(theta + delta)
        ok = _finite_rows(cand, e_new, g_new)
        rollbacks = rollbacks + (~ok & moving).long()
        accept = ok & (e_new.detach() <= e.detach()) & moving
        mu = torch.where(accept, (mu / 3).clamp_min(1e-7), mu * 4)
        theta = torch.where(accept[:, None], cand, theta)
        g = torch.where(accept[:, None], g_new, g)
        e = torch.where(accept, e_new, e)
        moving = moving & ok & (mu < 1e8)
        taken = taken + (moving | accept).long()
        gn = g.detach().norm(dim=1)
        # The next operator: the candidate's where every scene accepted it, a new one at the
        # mixed iterate where some did, the same one (with a larger mu) where none did.
        if bool(accept.all()):
            op = op_new
        elif bool(accept.any()):
            op = point(theta)[3] if sparse else None
    if not create_graph:
        theta = theta.detach()
    # With sparse products the last operator is at the final iterate: the implicit backward
    # reuses its Jacobian and blocks instead of building them a second time.
    final = op if (sparse and not create_graph) else None
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks, g.detach(), final)


class _SolveDerivative(torch.autograd.Function):
    """Zero in value, ``A^-1 grad`` in the backward (``A`` symmetric, given as a solver).

    Added to an approximate solution ``x`` of ``A x = b`` with ``r = b - A x`` (``x`` held
    constant in ``r``), it leaves the value ``x`` and gives the derivative of the exact
    solution ``A^-1 b``: ``A^-1 (db - dA x)``.
    """

    @staticmethod
    def forward(ctx, r: Tensor, solve):  # type: ignore[override]
        ctx.solve = solve
        return torch.zeros_like(r)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        with torch.no_grad():
            return ctx.solve(grad), None
