"""The context views the layer optimizes against."""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import DTypeError, NonFiniteError, ShapeError
from ..geometry.cameras import check_cameras
from ..geometry.sh import SHBasis


@dataclass
class ContextViews:
    """Context images and cameras, in the upstream conventions.

    Attributes:
        images: ``[b, v, 3, h, w]`` in [0, 1] (NoPoSplat's [-1, 1] shim must be undone first).
        extrinsics: OpenCV camera-to-world ``[b, v, 4, 4]``.
        intrinsics: Normalized K ``[b, v, 3, 3]``.
        near, far: ``[b, v]``.
        background: ``[3]`` or ``[b, 3]`` background colour of the renders (default black).
        sh_basis: SH basis of the backbone (``"e3nn"`` or ``"3dgs"``).
        weights: Optional per-pixel weights ``[b, v, 1, h, w]`` (e.g. a validity mask).
    """

    images: Float[Tensor, "batch view 3 height width"]
    extrinsics: Float[Tensor, "batch view 4 4"]
    intrinsics: Float[Tensor, "batch view 3 3"]
    near: Float[Tensor, "batch view"]
    far: Float[Tensor, "batch view"]
    background: Tensor | None = None
    sh_basis: SHBasis = "e3nn"
    weights: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.images.shape[0]

    @property
    def num_views(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def validate(self) -> None:
        if self.images is None:
            raise ShapeError("ContextViews.images is missing: the layer needs the context images")
        if not isinstance(self.images, Tensor) or self.images.ndim != 5 or self.images.shape[2] != 3:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else type(self.images).__name__
            raise ShapeError(f"context images must be [batch, view, 3, height, width], got {shape}")
        if not self.images.is_floating_point():
            raise DTypeError(f"context images must be floating point in [0, 1], got {self.images.dtype}")
        b, v = self.images.shape[:2]
        if self.images.shape[-1] == 0 or self.images.shape[-2] == 0 or v == 0:
            raise ShapeError(f"context images are empty: {tuple(self.images.shape)}")
        if self.extrinsics.shape[:2] != (b, v):
            raise ShapeError(
                f"{v} context images but extrinsics for {tuple(self.extrinsics.shape[:2])} "
                "(batch, views): the view counts must match")
        if self.intrinsics.shape[:2] != (b, v):
            raise ShapeError(f"{v} context images but intrinsics of shape {tuple(self.intrinsics.shape)}")
        for name in ("near", "far"):
            t = getattr(self, name)
            if tuple(t.shape) != (b, v):
                raise ShapeError(f"context {name} must be [{b}, {v}], got {tuple(t.shape)}")
        if not bool(torch.isfinite(self.images).all()):
            raise NonFiniteError("context images contain NaN or Inf")
        lo, hi = float(self.images.min()), float(self.images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ShapeError(
                f"context images must lie in [0, 1], found [{lo:.3f}, {hi:.3f}]. Images normalized "
                "to [-1, 1] (NoPoSplat's normalize shim) must be mapped back with x * 0.5 + 0.5")
        check_cameras(self.extrinsics, self.intrinsics, name="context cameras")
        if self.weights is not None and tuple(self.weights.shape) != (b, v, 1, *self.image_shape):
            raise ShapeError(f"weights must be [{b}, {v}, 1, h, w], got {tuple(self.weights.shape)}")

    def select(self, idx: Tensor) -> "ContextViews":
        """The views of a subset of the batch."""
        def pick(t):
            if t is None or not isinstance(t, Tensor) or t.ndim == 1:
                return t
            return t.index_select(0, idx)
        return ContextViews(pick(self.images), pick(self.extrinsics), pick(self.intrinsics),
                            pick(self.near), pick(self.far), pick(self.background),
                            self.sh_basis, pick(self.weights))

    def to(self, dtype: torch.dtype) -> "ContextViews":
        def cast(t):
            return t.to(dtype) if isinstance(t, Tensor) else t
        return ContextViews(cast(self.images), cast(self.extrinsics), cast(self.intrinsics),
                            cast(self.near), cast(self.far), cast(self.background), self.sh_basis,
                            cast(self.weights))

    def detached(self) -> "ContextViews":
        """Plain (non-inference, non-graph) copies, safe to use under any autograd mode."""
        def cl(t):
            return t.detach().clone() if isinstance(t, Tensor) else t
        return ContextViews(cl(self.images), cl(self.extrinsics), cl(self.intrinsics), cl(self.near),
                            cl(self.far), cl(self.background), self.sh_basis, cl(self.weights))
