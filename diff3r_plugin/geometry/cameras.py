"""Camera conventions: the one place where they are defined and checked.

Conventions (shared with pixelSplat, MVSplat, DepthSplat and NoPoSplat):

* ``extrinsics`` are **camera-to-world** 4x4 matrices in **OpenCV** axes
  (+x right, +y down, +z forward).
* ``intrinsics`` are **normalized** 3x3 K: row 0 divided by the image width, row 1 by the
  height, so that ``cx, cy`` are about 0.5 for a centred principal point.
* A pixel ``(i, j)`` (column, row) has its centre at normalized coordinate
  ``((i + 0.5) / W, (j + 0.5) / H)``.
* The upstream CUDA decoder projects with the field of view only (a symmetric frustum):
  ``get_fov`` reproduces its angle so that our renderers place pixels where theirs do.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import CameraConventionError, NonFiniteError, ShapeError


def check_cameras(
    extrinsics: Tensor,
    intrinsics: Tensor,
    *,
    name: str = "cameras",
    rotation_tol: float = 1e-3,
) -> None:
    """Raise a typed error unless the cameras follow the upstream conventions.

    Args:
        extrinsics: ``[..., 4, 4]`` camera-to-world matrices (OpenCV axes).
        intrinsics: ``[..., 3, 3]`` normalized intrinsics.
        name: Used in error messages.
        rotation_tol: Tolerance on ``R^T R = I`` and ``det R = 1``.
    """
    if extrinsics.shape[-2:] != (4, 4):
        raise ShapeError(f"{name}: extrinsics must end in (4, 4), got {tuple(extrinsics.shape)}")
    if intrinsics.shape[-2:] != (3, 3):
        raise ShapeError(f"{name}: intrinsics must end in (3, 3), got {tuple(intrinsics.shape)}")
    if extrinsics.shape[:-2] != intrinsics.shape[:-2]:
        raise ShapeError(
            f"{name}: extrinsics {tuple(extrinsics.shape)} and intrinsics "
            f"{tuple(intrinsics.shape)} disagree on the batch/view dimensions"
        )
    for label, t in (("extrinsics", extrinsics), ("intrinsics", intrinsics)):
        if not t.is_floating_point():
            raise CameraConventionError(f"{name}: {label} must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name}: {label} contain NaN or Inf")
    e = extrinsics.detach().double()
    bottom = e[..., 3, :]
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=e.dtype, device=e.device)
    if not bool(torch.allclose(bottom, expected.expand_as(bottom), atol=1e-5)):
        raise CameraConventionError(
            f"{name}: extrinsics must be homogeneous 4x4 camera-to-world matrices with last row "
            "[0, 0, 0, 1]"
        )
    rot = e[..., :3, :3]
    eye = torch.eye(3, dtype=e.dtype, device=e.device)
    ortho_err = (rot.transpose(-1, -2) @ rot - eye).abs().amax() if rot.numel() else 0.0
    if float(ortho_err) > rotation_tol:
        raise CameraConventionError(
            f"{name}: the rotation part of the extrinsics is not orthonormal (max |R^T R - I| = "
            f"{float(ortho_err):.2e}); expected rigid camera-to-world matrices"
        )
    if rot.numel():
        det = torch.linalg.det(rot)
        if bool((det < 0).any()):
            raise CameraConventionError(
                f"{name}: extrinsics have a reflection (det R = -1). This usually means OpenGL/"
                "Blender axes (y up, -z forward) were passed; convert to OpenCV with "
                "c2w @ diag(1, -1, -1, 1)"
            )
    k = intrinsics.detach().double()
    if k.numel():
        if not bool(torch.allclose(k[..., 2, :], torch.tensor([0.0, 0.0, 1.0], dtype=k.dtype,
                                                               device=k.device).expand_as(k[..., 2, :]),
                                   atol=1e-5)):
            raise CameraConventionError(f"{name}: intrinsics must have last row [0, 0, 1]")
        fx, fy = k[..., 0, 0], k[..., 1, 1]
        if bool((fx <= 0).any()) or bool((fy <= 0).any()):
            raise CameraConventionError(f"{name}: focal lengths must be positive")
        if bool((k[..., 0, 2].abs() > 4).any()) or bool((k[..., 1, 2].abs() > 4).any()):
            raise CameraConventionError(
                f"{name}: principal point (cx={float(k[..., 0, 2].flatten()[0]):.1f}) looks like "
                "pixel units; intrinsics must be normalized (row 0 divided by the width, row 1 "
                "by the height, so that cx, cy are about 0.5)"
            )


def invert_rigid(transform: Float[Tensor, "*batch 4 4"]) -> Float[Tensor, "*batch 4 4"]:
    """Invert rigid 4x4 transforms exactly (R^T, -R^T t); differentiable."""
    rot = transform[..., :3, :3]
    trans = transform[..., :3, 3:]
    rot_t = rot.transpose(-1, -2)
    top = torch.cat([rot_t, -rot_t @ trans], dim=-1)
    bottom = torch.zeros_like(transform[..., 3:, :])
    bottom[..., 3] = 1
    return torch.cat([top, bottom], dim=-2)


def get_fov(intrinsics: Float[Tensor, "*batch 3 3"]) -> Float[Tensor, "*batch 2"]:
    """Horizontal and vertical field of view (radians) as the upstream decoder computes it.

    Upstream unprojects the midpoints of the left/right (top/bottom) image edges with K^-1 and
    takes the angle between the two rays; for a centred principal point this is
    ``2 atan(0.5 / fx)``.
    """
    k_inv = torch.linalg.inv(intrinsics)

    def ray(x: float, y: float) -> Tensor:
        p = torch.tensor([x, y, 1.0], dtype=intrinsics.dtype, device=intrinsics.device)
        v = k_inv @ p
        return v / v.norm(dim=-1, keepdim=True)

    left, right, top, bottom = ray(0.0, 0.5), ray(1.0, 0.5), ray(0.5, 0.0), ray(0.5, 1.0)
    fov_x = (left * right).sum(-1).clamp(-1, 1).acos()
    fov_y = (top * bottom).sum(-1).clamp(-1, 1).acos()
    return torch.stack([fov_x, fov_y], dim=-1)


def focal_pixels(
    intrinsics: Float[Tensor, "*batch 3 3"], image_shape: tuple[int, int]
) -> Float[Tensor, "*batch 2"]:
    """Pixel focal lengths of the FoV-only projection: ``W / (2 tan(fov_x / 2))``."""
    h, w = image_shape
    tan_half = (0.5 * get_fov(intrinsics)).tan()
    return torch.stack([w / (2 * tan_half[..., 0]), h / (2 * tan_half[..., 1])], dim=-1)


def skew(v: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch 3 3"]:
    """Cross-product matrix [v]_x."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)],
        dim=-2,
    )


def se3_exp(tau: Float[Tensor, "*batch 6"]) -> Float[Tensor, "*batch 4 4"]:
    """Exponential map of se(3), ``tau = [rho (translation), theta (rotation)]``.

    The same parameterization as NoPoSplat's ``update_pose``: a pose delta is applied to a
    world-to-camera matrix as ``new_w2c = se3_exp(tau) @ w2c``. Written with series
    expansions near zero so that it is smooth (and forward-mode differentiable) at tau = 0,
    which is where every TTO starts.
    """
    rho, theta = tau[..., :3], tau[..., 3:]
    angle2 = (theta * theta).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = angle2 < 1e-8
    safe2 = torch.where(small, torch.ones_like(angle2), angle2)
    angle = safe2.sqrt()
    # a = sin(x)/x, b = (1-cos x)/x^2, c = (x - sin x)/x^3, with Taylor fallbacks.
    a = torch.where(small, 1 - angle2 / 6, angle.sin() / angle)
    b = torch.where(small, 0.5 - angle2 / 24, (1 - angle.cos()) / safe2)
    c = torch.where(small, 1.0 / 6 - angle2 / 120, (angle - angle.sin()) / (safe2 * angle))
    k = skew(theta)
    k2 = k @ k
    eye = torch.eye(3, dtype=tau.dtype, device=tau.device).expand(k.shape)
    rot = eye + a * k + b * k2
    v = eye + b * k + c * k2
    trans = (v @ rho[..., None])
    top = torch.cat([rot, trans], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom = bottom + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=tau.dtype, device=tau.device)
    return torch.cat([top, bottom], dim=-2)


def apply_pose_delta(
    extrinsics: Float[Tensor, "*batch 4 4"], tau: Float[Tensor, "*batch 6"]
) -> Float[Tensor, "*batch 4 4"]:
    """Update camera-to-world extrinsics by a pose delta acting on world-to-camera."""
    w2c = invert_rigid(extrinsics)
    return invert_rigid(se3_exp(tau) @ w2c)


def opengl_to_opencv(c2w: Float[Tensor, "*batch 4 4"]) -> Float[Tensor, "*batch 4 4"]:
    """Convert camera-to-world from OpenGL/Blender axes (y up, -z forward) to OpenCV."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    return c2w @ flip


def normalize_intrinsics(
    k_pixels: Float[Tensor, "*batch 3 3"], image_shape: tuple[int, int]
) -> Float[Tensor, "*batch 3 3"]:
    """Pixel-unit K to the normalized K the upstream repos use."""
    h, w = image_shape
    k = k_pixels.clone()
    k[..., 0, :] = k[..., 0, :] / w
    k[..., 1, :] = k[..., 1, :] / h
    return k


def look_at(
    eye: Float[Tensor, "*batch 3"], target: Float[Tensor, "*batch 3"],
    up: Float[Tensor, "*batch 3"] | None = None,
) -> Float[Tensor, "*batch 4 4"]:
    """OpenCV camera-to-world looking from ``eye`` at ``target`` (``up`` is world -y by default)."""
    if up is None:
        up = torch.tensor([0.0, -1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    z = target - eye
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(-up, z)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    rot = torch.stack([x, y, z], dim=-1)
    top = torch.cat([rot, eye[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def fov_to_normalized_focal(fov_x_deg: float) -> float:
    """Normalized focal length ``fx / W`` for a horizontal field of view in degrees."""
    return 0.5 / math.tan(math.radians(fov_x_deg) / 2)
