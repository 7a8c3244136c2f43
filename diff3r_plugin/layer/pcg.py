"""Batched, matrix-free preconditioned conjugate gradient.

Solves ``A_i x_i = b_i`` for every scene ``i`` of a batch, where ``A_i`` is symmetric positive
definite and only available through ``matvec``. Each scene has its own step sizes and its own
convergence test; a converged scene leaves the active set, and ``matvec`` is then called with
the indices of the remaining scenes only, so it stops costing work.

The right-hand side is normalized per scene before the solve, by its max-abs entry first and
then by the norm of the result (tiny cotangents, e.g. 1e-30, would otherwise underflow in
float32 norms and dot products), and the tolerance is relative to it:
``||b - A x|| <= tol ||b||``. Convergence is checked every ``check_every`` iterations, so the
loop talks to the host (a GPU synchronisation) only then.

Warning: when PCG stops at ``maxiter`` the returned solution is approximate, and so is any
implicit gradient built from it; :class:`PCGResult` says so per scene.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor, Tensor], Tensor]  # (vectors [k, n], scene indices [k]) -> [k, n]


@dataclass
class PCGResult:
    iterations: Tensor  # [b] int64
    rel_residual: Tensor  # [b] recursive residual ||r|| / ||b|| at exit
    converged: Tensor  # [b] bool
    indefinite: Tensor  # [b] bool: p^T A p <= 0 was met (A not positive definite)


def pcg(
    matvec: MatVec,
    rhs: Tensor,
    *,
    precond: "Tensor | Callable[[Tensor, Tensor], Tensor] | None" = None,
    x0: Tensor | None = None,
    tol: float = 1e-3,
    maxiter: int = 100,
    check_every: int = 5,
) -> tuple[Tensor, PCGResult]:
    """Solve ``A x = rhs`` per scene.

    Args:
        matvec: ``matvec(p, idx)`` returns ``A_idx p`` for the scenes ``idx``.
        rhs: ``[b, n]``.
        precond: ``[b, n]`` positive diagonal ``M`` (Jacobi): ``z = r / M``; or a callable
            ``precond(r, idx)`` applying ``M^-1`` (symmetric positive definite) to the rows of
            the scenes ``idx``; None for plain CG.
        x0: Warm start ``[b, n]`` (in the original, unnormalized scale); ignored for scenes
            whose right-hand side is zero (their solution is zero).
        tol: Relative residual tolerance.
        maxiter: Iteration cap per scene.
        check_every: Iterations between convergence checks (host synchronisations).
    """
    b, n = rhs.shape
    device = rhs.device
    # Max-abs first, then the norm of the rescaled vector: ||rhs|| itself underflows in float32
    # below about 1e-22 (its squares are below the smallest subnormal), which would make a tiny
    # but non-zero cotangent look like a zero one and give exactly zero gradients.
    peak = rhs.abs().amax(dim=1, keepdim=True)
    zero_rhs = (peak[:, 0] == 0)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    unit = rhs / peak
    unit_norm = unit.norm(dim=1, keepdim=True)  # in [1, sqrt(n)]: no under- or overflow
    bhat = unit / torch.where(zero_rhs[:, None], torch.ones_like(unit_norm), unit_norm)
    scale = torch.where(zero_rhs[:, None], torch.ones_like(peak), peak * unit_norm)
    x = torch.zeros_like(rhs) if x0 is None else torch.where(zero_rhs[:, None], 0.0, x0 / scale)
    all_idx = torch.arange(b, device=device)
    r = bhat - matvec(x, all_idx) if x0 is not None else bhat.clone()
    if callable(precond):
        apply_m = precond
    elif precond is not None:
        inv_m = 1.0 / precond

        def apply_m(v: Tensor, idx: Tensor) -> Tensor:
            return v * inv_m.index_select(0, idx)
    else:
        apply_m = None
    z = r if apply_m is None else apply_m(r, all_idx)
    p = z.clone()
    rz = (r * z).sum(1)
    iters = torch.zeros(b, dtype=torch.long, device=device)
    rel = r.norm(dim=1)
    converged = zero_rhs | (rel <= tol)
    indefinite = torch.zeros(b, dtype=torch.bool, device=device)
    active = all_idx[~converged]
    k = 0
    while active.numel() > 0 and k < maxiter:
        pa = p.index_select(0, active)
        ap = matvec(pa, active)
        pap = (pa * ap).sum(1)
        bad = ~(pap > 0)
        # p = 0 means the scene converged exactly since the last check; only a non-zero p
        # with p^T A p <= 0 shows that A is not positive definite.
        nonzero_p = (pa * pa).sum(1) > 0
        alpha = rz.index_select(0, active) / torch.where(bad, torch.ones_like(pap), pap)
        alpha = torch.where(bad, torch.zeros_like(alpha), alpha)
        x = x.index_add(0, active, alpha[:, None] * pa)
        r_a = r.index_select(0, active) - alpha[:, None] * ap
        z_a = r_a if apply_m is None else apply_m(r_a, active)
        rz_new = (r_a * z_a).sum(1)
        beta = rz_new / rz.index_select(0, active).clamp_min(torch.finfo(rhs.dtype).tiny)
        p = p.index_copy(0, active, z_a + beta[:, None] * pa)
        r = r.index_copy(0, active, r_a)
        rz = rz.index_copy(0, active, rz_new)
        iters = iters.index_add(0, active, torch.ones_like(active))
        indefinite = indefinite.index_copy(0, active, indefinite.index_select(0, active) | (bad & nonzero_p))
        k += 1
        if k % check_every == 0 or k == maxiter:
            rel = r.norm(dim=1)
            converged = converged | (rel <= tol)
            stop = converged | indefinite | ~torch.isfinite(rel)
            active = all_idx[~stop]
    rel = r.norm(dim=1)
    converged = zero_rhs | (rel <= tol)
    return x * scale, PCGResult(iters, rel, converged, indefinite)
