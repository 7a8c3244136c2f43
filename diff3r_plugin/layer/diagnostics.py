"""What the layer reports about each solve."""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..gaussians.layout import GaussianLayout
from .sparse_jacobian import gaussian_slots


@dataclass
class Diff3RInfo:
    """Diagnostics returned with ``theta*``; the backward fields are filled in by the backward.

    ``stationarity`` is ``||grad E(theta_K)|| / ||grad E(theta_0)||`` per scene: the implicit
    gradient is exact only at a stationary point, so read it next to the gradients.
    ``pcg_rel_residual`` is the *true* residual ``||g - H v|| / ||g||`` of the implicit solve
    (one extra matrix-vector product), not PCG's recursive estimate.

    Where the remaining gradient sits: ``stationarity_groups[g]`` is the same ratio restricted
    to the entries of group ``g`` (their squares sum to ``stationarity ** 2``), and
    ``grad_share_top1pct`` the share of ``||grad E(theta_K)||^2`` held by the 1 % of Gaussians
    with the largest gradients. A few Gaussians holding most of it (a share near 1) point to a
    local obstacle, e.g. Gaussians pressed against a depth-order swap, rather than to an inner
    solve that is short of steps everywhere.
    """

    inner_solver: str
    backward: str
    matvec: str
    hessian: str
    precond: str
    inner_steps: Tensor
    stationarity: Tensor
    initial_energy: Tensor
    final_energy: Tensor
    nan_rollbacks: Tensor
    forward_ms: float = 0.0
    pcg_iters: Tensor | None = None
    pcg_rel_residual: Tensor | None = None
    pcg_converged: Tensor | None = None
    pcg_indefinite: Tensor | None = None
    rhs_norm: Tensor | None = None
    backward_ms: float | None = None
    num_matvecs: int = 0
    messages: list[str] = field(default_factory=list)
    stationarity_groups: dict[str, Tensor] | None = None
    grad_share_top1pct: Tensor | None = None
    implicit_solution: Tensor | None = None  # v of H v = dL/dtheta* (a warm start for a later call)
    final_grad: Tensor | None = None  # grad E(theta_K) [b, n], detached: where the solve stopped
    warm_started: bool = False
    visibility: str = "per_step"
    stale_pairs: Tensor | None = None
    stale_order_pixels: Tensor | None = None

    def summary(self) -> dict:
        """Plain-Python scalars (means over the batch) for logging."""
        def mean(t):
            if t is None:
                return None
            t = t.detach().float()
            return float(t.mean()) if t.numel() else None

        return {
            "inner_solver": self.inner_solver, "backward": self.backward, "matvec": self.matvec,
            "hessian": self.hessian, "precond": self.precond,
            "inner_steps": mean(self.inner_steps), "stationarity": mean(self.stationarity),
            "initial_energy": mean(self.initial_energy), "final_energy": mean(self.final_energy),
            "nan_rollbacks": int(self.nan_rollbacks.sum()) if self.nan_rollbacks is not None else 0,
            "forward_ms": self.forward_ms, "pcg_iters": mean(self.pcg_iters),
            "pcg_rel_residual": None if self.pcg_rel_residual is None else float(self.pcg_rel_residual.max()),
            "pcg_converged": None if self.pcg_converged is None else bool(self.pcg_converged.all()),
            "backward_ms": self.backward_ms, "messages": list(self.messages),
            "stationarity_groups": None if self.stationarity_groups is None else {
                g: mean(t) for g, t in self.stationarity_groups.items()},
            "grad_share_top1pct": mean(self.grad_share_top1pct),
            "warm_started": self.warm_started, "visibility": self.visibility,
            "stale_pairs": mean(self.stale_pairs), "stale_order_pixels": mean(self.stale_order_pixels),
        }


def _per_gaussian_sq(grad: Tensor, layout: GaussianLayout) -> Tensor:
    """``[b, G]``: squared gradient norm of each Gaussian over all its attributes."""
    return (grad[:, gaussian_slots(layout, grad.device)] ** 2).sum(-1)


def _top_count(layout: GaussianLayout, fraction: float) -> int:
    return min(layout.num_gaussians, max(1, math.ceil(fraction * layout.num_gaussians)))


def _top(grad: Tensor, layout: GaussianLayout, fraction: float):
    """``topk`` of the per-Gaussian squared gradient norms over the ``ceil(fraction * G)`` largest."""
    return _per_gaussian_sq(grad, layout).topk(_top_count(layout, fraction), dim=1)


def top_gaussians(grad: Tensor, layout: GaussianLayout, fraction: float = 0.01) -> Tensor:
    """Indices ``[b, k]`` of the ``ceil(fraction * G)`` Gaussians with the largest gradient norm
    (over all their attributes)."""
    return _top(grad, layout, fraction).indices


def gaussian_entry_mask(indices: Tensor, layout: GaussianLayout) -> Tensor:
    """``[b, n]`` bool mask of every parameter entry of the Gaussians ``indices`` ``[b, k]``."""
    b = indices.shape[0]
    entries = gaussian_slots(layout, indices.device)[indices].reshape(b, -1)
    return torch.zeros(b, layout.numel, dtype=torch.bool, device=indices.device).scatter_(1, entries, True)


def gradient_breakdown(grad: Tensor, grad_norm0: Tensor,
                       layout: GaussianLayout) -> tuple[dict[str, Tensor], Tensor]:
    """Per-group stationarity ``||grad_g|| / ||grad E(theta_0)||`` (``[b]`` per group) and the
    share of ``||grad||^2`` held by the ``ceil(1 %)`` of Gaussians with the largest gradients
    (``[b]``; 0 where the gradient is zero)."""
    grad = grad.detach()
    denom = grad_norm0.detach().clamp_min(torch.finfo(grad.dtype).tiny)
    groups = {g: torch.where(grad_norm0 > 0, grad[:, s].norm(dim=1) / denom, torch.zeros_like(denom))
              for g, s in layout.slices.items()}
    total = (grad * grad).sum(1)
    if layout.num_gaussians == 0:
        return groups, torch.zeros_like(total)
    top = _top(grad, layout, 0.01).values.sum(1)
    share = torch.where(total > 0, top / total.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(total))
    return groups, share


def scene_extent(theta_means: Tensor) -> Tensor:
    """RMS distance of the means from their centroid, per scene ``[b]`` (scales the means' rate)."""
    c = theta_means.mean(1, keepdim=True)
    return ((theta_means - c) ** 2).sum(-1).mean(1).sqrt().clamp_min(1e-6)
