"""One embedded scene: all views of a camera walk through a textured room, ray-cast exactly."""

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...errors import DataError, ShapeError
from .caster import _Caster, _pixel_rays, _texture_size
from .layout import _FAR_MARGIN, _NEAR, SceneLayout, _camera_poses, _sample_layout

@dataclass
class EmbeddedScene:
    """One ray-cast scene: all views of a camera walk through a textured room.

    Attributes:
        key: Scene name, ``"embedded_<seed>"``.
        images: Float32 colours in ``[0, 1]``.
        extrinsics: Camera-to-world, OpenCV axes.
        intrinsics: Normalized K, ``cx = cy = 0.5``.
        near: Per-view near plane (lower bound on every visible depth).
        far: Per-view far plane (upper bound on every visible depth).
        depths: Ground-truth camera-frame z of the surface through each pixel centre.
        seed: The seed the scene was built from, if any.
        layout: The geometry that was ray-cast, if known (for checks and debugging).
    """

    key: str
    images: Float[Tensor, "view 3 height width"]
    extrinsics: Float[Tensor, "view 4 4"]
    intrinsics: Float[Tensor, "view 3 3"]
    near: Float[Tensor, " view"]
    far: Float[Tensor, " view"]
    depths: Float[Tensor, "view height width"]
    seed: Optional[int] = None
    layout: Optional[SceneLayout] = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ShapeError(f"{self.key}: images must be [N, 3, H, W], "
                             f"got {tuple(self.images.shape)}")
        n, _, h, w = self.images.shape
        expected = {
            "extrinsics": (n, 4, 4), "intrinsics": (n, 3, 3), "near": (n,), "far": (n,),
            "depths": (n, h, w),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ShapeError(f"{self.key}: {name} must have shape {shape} to match images "
                                 f"{tuple(self.images.shape)}, got {got}")

    @property
    def num_views(self) -> int:
        """Number of views ``N``."""
        return self.images.shape[0]

    @property
    def image_shape(self) -> Tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.images.shape[-2:])


def _check_image_shape(image_shape: Any) -> Tuple[int, int]:
    try:
        h, w = (operator.index(s) for s in image_shape)
    except (TypeError, ValueError) as error:
        raise ShapeError(f"image_shape must be two integers (H, W), got {image_shape!r}") \
            from error
    if h < 1 or w < 1:
        raise ShapeError(f"image_shape must be positive, got {(h, w)}")
    return h, w


def make_scene(
    seed: int,
    num_views: int = 8,
    image_shape: Tuple[int, int] = (64, 64),
    supersample: int = 2,
) -> EmbeddedScene:
    """Ray-cast one scene; a pure function of its arguments.

    Args:
        seed: Scene seed, ``>= 0``. Seeds ``< 10000`` are training scenes, seeds ``>= 10000``
            held-out evaluation scenes (see the module docstring).
        num_views: Number of views along the camera walk, evenly spaced in path time.
        image_shape: ``(H, W)`` in pixels.
        supersample: ``s`` for ``s x s`` rays per pixel (anti-aliasing); 1 disables it.

    Returns:
        The scene, with ground-truth depth.

    Raises:
        DataError: ``seed`` is negative or not an integer, or a photo cannot be loaded.
        ShapeError: ``num_views``, ``image_shape`` or ``supersample`` is not a positive integer.
    """
    try:
        seed = operator.index(seed)
    except TypeError as error:
        raise DataError(f"seed must be an integer, got {seed!r}") from error
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    h, w = _check_image_shape(image_shape)
    for name, value in (("num_views", num_views), ("supersample", supersample)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    num_views, supersample = int(num_views), int(supersample)

    layout = _sample_layout(seed)
    extrinsics = torch.tensor(_camera_poses(layout.path, num_views), dtype=torch.float32)
    # Square pixels: the focal length in pixels is shared, so fy/H = fx/W * W/H.
    fx = 0.5 / math.tan(layout.hfov / 2)
    k = torch.tensor([[fx, 0.0, 0.5], [0.0, fx * w / h, 0.5], [0.0, 0.0, 1.0]])
    intrinsics = k.expand(num_views, 3, 3).clone()

    caster = _Caster(layout, _texture_size((h, w), supersample))
    grid = (torch.arange(supersample, dtype=torch.float32) + 0.5) / supersample
    offsets = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1).reshape(-1, 2)
    origins, directions = _pixel_rays(extrinsics, intrinsics, (h, w), offsets)
    _, colour = caster.cast(origins, directions, shade=True)
    images = colour.reshape(num_views, h, w, supersample ** 2, 3).mean(dim=3)
    images = images.permute(0, 3, 1, 2).contiguous()

    # Depth is defined at the pixel centre, a ray that an even supersampling grid never casts.
    origins, directions = _pixel_rays(extrinsics, intrinsics, (h, w),
                                      torch.tensor([[0.5, 0.5]]))
    depth, _ = caster.cast(origins, directions, shade=False)
    depths = depth.reshape(num_views, h, w)
    if not bool(torch.isfinite(depths).all()):
        raise DataError(f"scene {seed}: a ray left the room; the layout sampler is broken")

    flat = depths.reshape(num_views, -1)
    near = torch.minimum(torch.full((num_views,), _NEAR), 0.9 * flat.min(dim=1).values)
    far = _FAR_MARGIN * flat.max(dim=1).values
    return EmbeddedScene(
        key=f"embedded_{seed:06d}", images=images, extrinsics=extrinsics,
        intrinsics=intrinsics, near=near, far=far, depths=depths, seed=seed, layout=layout,
    )
