"""What the layer reports about each solve."""

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Diff3RInfo:
    """Diagnostics returned with ``theta*``; the backward fields are filled in by the backward.

    ``stationarity`` is ``||grad E(theta_K)|| / ||grad E(theta_0)||`` per scene: the implicit
    gradient is exact only at a stationary point, so read it next to the gradients.
    ``pcg_rel_residual`` is the *true* residual ``||g - H v|| / ||g||`` of the implicit solve
    (one extra matrix-vector product), not PCG's recursive estimate.
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
        }


def scene_extent(theta_means: Tensor) -> Tensor:
    """RMS distance of the means from their centroid, per scene ``[b]`` (scales the means' rate)."""
    c = theta_means.mean(1, keepdim=True)
    return ((theta_means - c) ** 2).sum(-1).mean(1).sqrt().clamp_min(1e-6)


def empty_long(b: int, device) -> Tensor:
    return torch.zeros(b, dtype=torch.long, device=device)
