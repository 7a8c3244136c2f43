"""Pinhole projection in normalized coordinates, and the pixel-centre grid.

Conventions (those of :mod:`diff3r_plugin.geometry.cameras`):

* A pixel ``(i, j)`` (column, row) of an ``H x W`` image has its centre at the normalized image
  coordinate ``((i + 0.5) / W, (j + 0.5) / H)``; grids are row-major (pixel ``j * W + i``), the
  order in which pixel-aligned encoders emit their Gaussians.
* The ray through a normalized image point ``u`` is ``K^-1 [u, 1]`` with normalized ``K``: a
  camera-frame direction with ``z = 1``, so a ray parameter is the camera-frame depth.
* :func:`project` maps world points through a world-to-camera matrix to normalized camera
  coordinates ``(x / z, y / z)`` (no ``K``): the quantity PnP fits.

The renderers use the FoV-only pixel projection of the upstream rasterizers instead
(:func:`diff3r_plugin.geometry.cameras.focal_pixels`); these helpers serve the encoders, pose
estimation and the ray caster.
"""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["pixel_centers", "pixel_rays", "project"]


def pixel_centers(
    h: int, w: int, *, offset: tuple[float, float] = (0.5, 0.5),
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> Float[Tensor, "pixel 2"]:
    """Normalized image coordinates ``(x, y) = ((i + o_x) / W, (j + o_y) / H)``, row-major.

    Args:
        h, w: Image height and width in pixels.
        offset: Where inside the pixel to sample, in pixel units; ``(0.5, 0.5)`` is the centre
            (other offsets give the sub-pixel samples of a supersampled ray caster).
    """
    xs = (torch.arange(w, dtype=dtype, device=device) + offset[0]) / w
    ys = (torch.arange(h, dtype=dtype, device=device) + offset[1]) / h
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], -1).reshape(h * w, 2)


def pixel_rays(
    intrinsics: Float[Tensor, "*batch 3 3"], h: int, w: int
) -> Float[Tensor, "*batch pixel 3"]:
    """Camera-frame directions ``K^-1 [x, y, 1]`` (``z = 1``) through the pixel centres."""
    xy = pixel_centers(h, w, dtype=intrinsics.dtype, device=intrinsics.device)
    homogeneous = torch.cat([xy, torch.ones_like(xy[:, :1])], -1)  # [hw, 3]
    return homogeneous @ torch.linalg.inv(intrinsics).transpose(-1, -2)


def project(
    points: Float[Tensor, "*batch point 3"], w2c: Float[Tensor, "*batch 4 4"], *,
    min_depth: float = 1e-9,
) -> Float[Tensor, "*batch point 2"]:
    """Normalized camera coordinates ``(x / z, y / z)`` of ``[x, y, z] = R p + t``.

    ``|z|`` below ``min_depth`` is replaced by ``min_depth`` so that a point in the camera's
    plane gives a large but finite coordinate (PnP weighs such points down, never divides by 0).
    """
    cam = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = cam[..., 2:]
    z = torch.where(z.abs() < min_depth, torch.full_like(z, min_depth), z)
    return cam[..., :2] / z
