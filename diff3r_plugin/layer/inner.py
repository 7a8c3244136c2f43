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


@dataclass
class InnerResult:
    theta: Tensor
    steps: Tensor  # [b]
    grad_norm0: Tensor  # [b]
    grad_norm: Tensor  # [b]
    energy0: Tensor
    energy: Tensor
    nan_rollbacks: Tensor


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
    m = torch.zeros_like(theta0)
    v = torch.zeros_like(theta0)
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
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** (k + 1))
        vhat = v / (1 - b2 ** (k + 1))
        # sqrt with a zero derivative at v = 0: entries whose gradient is always zero (culled
        # Gaussians) would otherwise turn the unrolled backward into 0 * inf = NaN.
        pos = vhat > 0
        root = torch.where(pos, torch.where(pos, vhat, torch.ones_like(vhat)).sqrt(), torch.zeros_like(vhat))
        step = lr * mhat / (root + eps)
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
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks)


def lm_solve(obj: Objective, theta0: Tensor, lam: Tensor, steps: int, *, damping: float = 1e-3,
             tol: float = 1e-4, pcg_iters: int = 20, precond_probes: int = 4,
             matvec: str = "autodiff", fd_eps: float = 1e-3, create_graph: bool = False,
             progress: bool = False, generator: torch.Generator | None = None) -> InnerResult:
    """Levenberg-Marquardt on ``E``: each step solves
    ``(J^T J + Lambda + mu D) delta = -grad E`` with PCG, ``D = diag(J^T J) + Lambda``
    (estimated), and accepts it where the energy decreases (``mu /= 3``), else ``mu *= 4``."""
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

        delta, _ = pcg(a_mv, -g, precond=(1 + mu_c[:, None]) * diag, tol=1e-2, maxiter=pcg_iters,
                       check_every=max(1, pcg_iters // 4))
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
    return InnerResult(theta, taken, g0, gn, e0.detach(), e.detach(), rollbacks)


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
