"""The context views the layer optimizes against."""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ConfigError, DTypeError, NonFiniteError, ShapeError, ValueRangeError
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
        weights: Optional per-pixel weights ``[b, v, 1, h, w]`` (e.g. a validity mask), >= 0.

    :meth:`validate` (called by the layer) raises a typed error naming the field for wrong
    shapes, NaN/Inf anywhere, images outside [0, 1], ``near <= 0`` or ``far <= near``,
    negative weights and non-OpenCV cameras. The layer casts the views to the dtype of
    ``theta0`` and treats them as constants: no gradient flows back into them (a warning says
    so when some of them require grad).
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
        for name in ("extrinsics", "intrinsics", "near", "far"):
            if not isinstance(getattr(self, name), Tensor):
                raise DTypeError(f"ContextViews.{name} must be a torch.Tensor, got "
                                 f"{type(getattr(self, name)).__name__}")
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
        self._validate_depth_range(b, v)
        self._validate_background(b)
        if self.weights is not None:
            w = self.weights
            if not isinstance(w, Tensor) or tuple(w.shape) != (b, v, 1, *self.image_shape):
                got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ShapeError(f"weights must be [{b}, {v}, 1, h, w], got {got}")
            if not w.is_floating_point():
                raise DTypeError(f"ContextViews.weights must be floating point, got {w.dtype}")
            if not bool(torch.isfinite(w).all()):
                raise NonFiniteError(f"ContextViews.weights contain {int((~torch.isfinite(w)).sum())} NaN/Inf value(s)")
            if bool((w < 0).any()):
                raise ValueRangeError(
                    f"ContextViews.weights has {int((w < 0).sum())} negative value(s) (min "
                    f"{float(w.min()):.3g}); pixel weights must be >= 0 (their square roots weight "
                    "the residuals)")
        if self.sh_basis not in ("e3nn", "3dgs"):
            raise ConfigError(f"ContextViews.sh_basis must be 'e3nn' or '3dgs', got {self.sh_basis!r}")

    def _validate_depth_range(self, b: int, v: int) -> None:
        """``0 < near < far``, finite. ``near`` sets the culling plane ``z <= 0.2 near``: a NaN
        near culls everything (``theta*`` would silently stay ``theta0``), a negative one lets
        Gaussians behind the camera through, which the projection then renders mirrored."""
        for name in ("near", "far"):
            t = getattr(self, name)
            if not t.is_floating_point():
                raise DTypeError(f"context {name} must be floating point, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"context {name} contains {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
        if bool((self.near <= 0).any()):
            raise ValueRangeError(f"context near must be > 0 (the culling plane is z <= 0.2 near), got "
                                  f"min {float(self.near.min()):.3g}")
        if bool((self.far <= self.near).any()):
            i = torch.nonzero(self.far <= self.near)[0].tolist()
            raise ValueRangeError(
                f"context far must be > near; at (batch, view) {tuple(i)} near = "
                f"{float(self.near[i[0], i[1]]):.3g} and far = {float(self.far[i[0], i[1]]):.3g}")

    def _validate_background(self, b: int) -> None:
        bg = self.background
        if bg is None:
            return
        if not isinstance(bg, Tensor) or tuple(bg.shape) not in ((3,), (b, 3)):
            got = tuple(bg.shape) if isinstance(bg, Tensor) else type(bg).__name__
            raise ShapeError(f"ContextViews.background must be [3] or [{b}, 3], got {got}")
        if not bg.is_floating_point():
            raise DTypeError(f"ContextViews.background must be floating point, got {bg.dtype}")
        if not bool(torch.isfinite(bg).all()):
            raise NonFiniteError("ContextViews.background contains NaN/Inf: every rendered pixel would be NaN")

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
