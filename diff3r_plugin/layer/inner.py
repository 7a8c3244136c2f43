"""Inner (test-time) solvers: Adam with per-group rates, and Levenberg-Marquardt with PCG.

Both work per scene: a scene whose iterate turns non-finite is rolled back to its last finite
iterate and frozen (counted in ``nan_rollbacks``); a scene that reaches the stationarity
tolerance stops moving. With ``create_graph=True`` every step stays on the autograd graph (the
``unroll`` reference backward); memory then grows with the number of steps.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .matvec import make_matvec
from .objective import Objective
from .pcg import pcg
from .sparse_jacobian import SparseJacobian, block_preconditioner


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


def _energy_and_grad(obj: Objective, theta: Tensor, theta0: Tensor, lam: Tensor, sqrt_w,
                     create_graph: bool):
    if not theta.requires_grad:
        theta = theta.detach().requires_grad_(True)
    e = obj.energy(theta, theta0, lam, sqrt_w=sqrt_w)
    g = torch.autograd.grad(e.sum(), theta, create_graph=create_graph)[0]
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
        g = torch.where(keep, g_new, g)
        e = torch.where(ok, e_new, e)
        taken = taken + moving.long()
        gn = g.detach().norm(dim=1)
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks, g.detach())


def lm_solve(obj: Objective, theta0: Tensor, lam: Tensor, steps: int, *, damping: float = 1e-3,
             tol: float = 1e-4, pcg_iters: int = 50, pcg_tol: float = 1e-2, precond: str = "block_jacobi",
             precond_probes: int = 4, matvec: str = "sparse", fd_eps: float = 1e-3,
             create_graph: bool = False, progress: bool = False,
             generator: torch.Generator | None = None) -> InnerResult:
    """Levenberg-Marquardt on ``E``: each step solves
    ``(J^T J + Lambda + mu D) delta = -grad E`` with PCG, ``D = diag(J^T J) + Lambda``, and
    accepts it where the energy decreases, else grows ``mu``.

    With ``matvec="sparse"`` (torch backend) every step linearizes the renderer once into its
    explicit factored Jacobian (:mod:`.sparse_jacobian`), which gives the energy, the gradient
    ``J^T r + Lambda (theta - theta0)``, cheap products, the exact ``D`` and, with
    ``precond="block_jacobi"``, exact per-Gaussian preconditioner blocks. Other matvecs use
    passes through the renderer and an estimated ``D``.

    With ``create_graph=True`` (the unrolled reference) every step stays on the autograd graph:
    with ``matvec="sparse"`` each step's linear solve is differentiated exactly, by an adjoint
    solve with the same matrix (memory: one linearization per step); with the other matvecs by
    autograd through the PCG iterations. The damping ``mu``, the scaling ``D`` and the
    preconditioner are constants of each step.
    """
    if matvec == "sparse":
        return _lm_sparse(obj, theta0, lam, steps, damping=damping, tol=tol, pcg_iters=pcg_iters,
                          pcg_tol=pcg_tol, precond=precond, create_graph=create_graph, progress=progress)
    b = theta0.shape[0]
    device = theta0.device
    theta = theta0 if create_graph else theta0.detach().clone()
    mu = torch.full((b,), damping, dtype=theta0.dtype, device=device)
    taken = torch.zeros(b, dtype=torch.long, device=device)
    rollbacks = torch.zeros(b, dtype=torch.long, device=device)
    moving = torch.ones(b, dtype=torch.bool, device=device)
    sqrt_w = obj.pixel_weights(theta0.detach())
    theta, e0, g = _energy_and_grad(obj, theta, theta0, lam, sqrt_w, create_graph)
    g0 = g.detach().norm(dim=1)
    e, gn = e0, g0
    lam_d = lam.detach()
    for _ in tqdm(range(steps), disable=not progress, desc="TTO (lm)", leave=False):
        moving = moving & (gn > tol * g0)
        if not bool(moving.any()):
            break
        mv = make_matvec(matvec, "gauss_newton", obj, theta.detach(), theta0.detach(), lam_d, fd_eps)
        diag = mv.jtj_diag(precond_probes, generator) + lam_d
        mu_c = mu.clone()

        if create_graph:
            graph_mv = _GraphGN(obj, theta, sqrt_w)

            def a_mv(p, idx):
                return graph_mv(p, idx) + (lam.index_select(0, idx) + mu_c.index_select(0, idx)[:, None]
                                           * diag.index_select(0, idx)) * p
        else:
            def a_mv(p, idx):
                return mv(p, idx) + mu_c.index_select(0, idx)[:, None] * diag.index_select(0, idx) * p

        delta, _ = pcg(a_mv, -g, precond=None if precond == "none" else (1 + mu_c[:, None]) * diag,
                       tol=pcg_tol, maxiter=pcg_iters, check_every=max(1, min(5, pcg_iters // 4)))
        delta = delta * moving[:, None].to(delta)
        cand, e_new, g_new = _energy_and_grad(obj, theta + delta, theta0, lam, sqrt_w, create_graph)
        ok = _finite_rows(cand, e_new, g_new)
        rollbacks = rollbacks + (~ok & moving).long()
        accept = ok & (e_new.detach() <= e.detach()) & moving
        theta = torch.where(accept[:, None], cand, theta)
        g = torch.where(accept[:, None], g_new, g)
        e = torch.where(accept, e_new, e)
        mu = torch.where(accept, (mu / 3).clamp_min(1e-7), mu * 4)
        moving = moving & ok & (mu < 1e8)
        taken = taken + (moving | accept).long()
        gn = g.detach().norm(dim=1)
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks, g.detach())


def _lm_sparse(obj: Objective, theta0: Tensor, lam: Tensor, steps: int, *, damping: float, tol: float,
               pcg_iters: int, pcg_tol: float, precond: str, create_graph: bool,
               progress: bool) -> InnerResult:
    b = theta0.shape[0]
    device = theta0.device
    sqrt_w = obj.pixel_weights(theta0.detach())
    lam_d = lam.detach()
    adjoint_tol = 1e-5 if theta0.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10

    def linearize(t: Tensor):
        t = t if create_graph else t.detach()
        plan = obj.make_plan(t)
        with torch.set_grad_enabled(create_graph):
            sj = SparseJacobian.build(t, obj.layout, obj.views, plan, sqrt_w)
            d = t - theta0
            r = sj.residual
            e = 0.5 * (r * r).sum(1) + 0.5 * (lam * d * d).sum(1)
            g = sj.vjp(r) + lam * d
        return sj, e, g

    theta = theta0 if create_graph else theta0.detach().clone()
    mu = torch.full((b,), damping, dtype=theta0.dtype, device=device)
    taken = torch.zeros(b, dtype=torch.long, device=device)
    rollbacks = torch.zeros(b, dtype=torch.long, device=device)
    moving = torch.ones(b, dtype=torch.bool, device=device)
    sj, e0, g = linearize(theta)
    g0 = g.detach().norm(dim=1)
    e, gn = e0, g0
    for _ in tqdm(range(steps), disable=not progress, desc="TTO (lm)", leave=False):
        moving = moving & (gn > tol * g0)
        if not bool(moving.any()):
            break
        with torch.no_grad():
            blocks = sj.block_diagonal() if precond == "block_jacobi" else None
            jtj = sj.diagonal(blocks=blocks)
            scale = (jtj + lam_d) * mu[:, None]  # mu D
            diag = jtj + lam_d + scale
            if blocks is not None:
                blocks = blocks + torch.diag_embed((lam_d + scale)[:, sj.slots])
                pre = block_preconditioner(blocks, diag, sj.slots)
            elif precond == "jacobi":
                pre = diag
            else:
                pre = None

        def a_mv(p, idx, sj=sj, scale=scale):
            full = p if idx.numel() == b else torch.zeros(b, p.shape[1], dtype=p.dtype, device=p.device).index_copy(0, idx, p)
            out = sj.gauss_newton(full)
            out = out if idx.numel() == b else out.index_select(0, idx)
            return out + (lam.index_select(0, idx) + scale.index_select(0, idx)) * p

        with torch.no_grad():
            delta, _ = pcg(a_mv, -g.detach(), precond=pre, tol=pcg_tol, maxiter=pcg_iters,
                           check_every=max(1, min(5, pcg_iters // 4)))
        if create_graph:
            # The step as a differentiable function of theta: delta = A(theta)^-1 (-g(theta)).
            # Its value is the PCG step actually taken (so the trajectory is the implicit run's),
            # its derivative that of the exact solve, -A^-1 (dg + dA delta), from one adjoint
            # solve with the same A (see _SolveDerivative): the graph holds one linearization per
            # step instead of every PCG iteration. The adjoint tolerance is what the dtype can
            # reach (float32 PCG stalls near 1e-6).
            def solve(rhs, a_mv=a_mv, pre=pre):
                return pcg(a_mv, rhs, precond=pre, tol=adjoint_tol, maxiter=max(10 * pcg_iters, 500))[0]

            resid = -g - (sj.gauss_newton(delta) + (lam + scale) * delta)
            delta = delta + _SolveDerivative.apply(resid, solve)
        delta = delta * moving[:, None].to(delta)
        cand = theta + delta
        sj_new, e_new, g_new = linearize(cand)
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
        if bool(accept.all()):
            sj = sj_new
        elif bool(accept.any()):
            sj = linearize(theta)[0]
    if not create_graph:
        theta = theta.detach()
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks, g.detach())


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


class _GraphGN:
    """``J^T W J p`` that stays differentiable w.r.t. the linearization point (for unrolling)."""

    def __init__(self, obj: Objective, theta: Tensor, sqrt_w):
        self.theta = theta
        self.r = obj.residual(theta, sqrt_w=sqrt_w)
        self.u = torch.zeros_like(self.r, requires_grad=True)
        self.jtu = torch.autograd.grad(self.r, theta, self.u, create_graph=True)[0]

    def __call__(self, p: Tensor, idx: Tensor) -> Tensor:
        full = torch.zeros_like(self.theta).index_copy(0, idx, p)
        jp = torch.autograd.grad(self.jtu, self.u, full, create_graph=True)[0]
        jtjp = torch.autograd.grad(self.r, self.theta, jp, create_graph=True)[0]
        return jtjp.index_select(0, idx)
