"""Perspective-n-point: the pose of a calibrated camera from 2D-3D matches.

Pose-free encoders (NoPoSplat, the built-in :class:`~diff3r_plugin.models.TinyPoseFreeEncoder`)
predict one 3D point per context pixel in the frame of context view 0; the pixel centres of
view ``j`` and its predicted points are matches from which view ``j``'s camera follows. The
upstream evaluation solves the same problem with OpenCV's PnP-RANSAC; here it is torch only:

1. Weighted DLT for the 3x4 matrix ``P ~ [R | t]`` after Hartley conditioning of the 3D points
   (centroid at 0, RMS distance 1): the right singular vector of the smallest singular value
   of the ``2N x 12`` system ``x (p3 . X) = p1 . X``, ``y (p3 . X) = p2 . X``.
2. Its sign fixed so that ``det P[:, :3] > 0``, the nearest rotation by Procrustes
   (``R = U V^T``) and the scale by the mean singular value.
3. Gauss-Newton on the weighted reprojection error ``sum_i w_i |pi(R X_i + t) - x_i|^2`` over
   left-multiplied se(3) deltas (:func:`~diff3r_plugin.geometry.cameras.se3_exp`), with the
   analytic Jacobian ``d pi / d cam [I | -[cam]_x]``; a step is kept only where it lowers the
   error.

Everything runs in float64 without gradients (a pose estimate, like the upstream one).
"""

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ShapeError
from .cameras import se3_exp, skew
from .projection import project

__all__ = ["solve_pnp"]

MIN_MATCHES = 6


def solve_pnp(
    points: Float[Tensor, "*batch point 3"],
    image_points: Float[Tensor, "*batch point 2"],
    weights: Float[Tensor, "*batch point"] | None = None,
    *,
    refine_iters: int = 10,
) -> Float[Tensor, "*batch 4 4"]:
    """World-to-camera pose from world points and their normalized camera coordinates.

    Args:
        points: World points ``X_i``; at least 6 per problem.
        image_points: Their observed normalized camera coordinates ``(x / z, y / z)``, i.e.
            ``K^-1`` already applied (see :func:`~diff3r_plugin.geometry.projection.pixel_rays`).
        weights: Non-negative match weights ``w_i`` (e.g. an opacity mask); all ones if None.
        refine_iters: Gauss-Newton iterations after the DLT.

    Returns:
        World-to-camera matrices ``[R | t; 0 0 0 1]`` (OpenCV axes) in the dtype of ``points``;
        invert with :func:`~diff3r_plugin.geometry.cameras.invert_rigid` for camera-to-world.
        Degenerate matches (all weights zero, coplanar points) can give non-finite entries:
        callers check ``torch.isfinite`` and fall back.
    """
    batch_shape, n = points.shape[:-2], points.shape[-2]
    if n < MIN_MATCHES:
        raise ShapeError(f"PnP needs at least {MIN_MATCHES} matches, got {n}")
    if tuple(image_points.shape) != (*batch_shape, n, 2):
        raise ShapeError(f"image_points must be {[*batch_shape, n, 2]} to match points "
                         f"{list(points.shape)}, got {list(image_points.shape)}")
    if weights is not None and tuple(weights.shape) != (*batch_shape, n):
        raise ShapeError(f"weights must be {[*batch_shape, n]}, got {list(weights.shape)}")
    with torch.no_grad():
        X = points.detach().double().reshape(-1, n, 3)
        x = image_points.detach().double().to(X.device).reshape(-1, n, 2)
        b = X.shape[0]
        w = (torch.ones(b, n, dtype=X.dtype, device=X.device) if weights is None
             else weights.detach().double().to(X.device).reshape(b, n))
        w2c = _dlt(X, x, w)
        sw = w.sqrt()[..., None]
        cost = _cost(X, x, sw, w2c)
        for _ in range(refine_iters):
            step = _gauss_newton_step(X, x, sw, w2c)
            candidate = se3_exp(step) @ w2c
            new_cost = _cost(X, x, sw, candidate)
            better = new_cost <= cost
            w2c = torch.where(better[:, None, None], candidate, w2c)
            cost = torch.where(better, new_cost, cost)
            if float(step.norm(dim=-1).amax()) < 1e-12:
                break
        return w2c.reshape(*batch_shape, 4, 4).to(points.dtype)


def _dlt(X: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``[b, 4, 4]`` world-to-camera from the weighted, Hartley-conditioned DLT."""
    b = X.shape[0]
    wsum = w.sum(1, keepdim=True).clamp_min(1e-12)
    c = (w[..., None] * X).sum(1, keepdim=True) / wsum[..., None]
    sigma = ((w * ((X - c) ** 2).sum(-1)).sum(1, keepdim=True) / wsum).sqrt().clamp_min(1e-12)
    Xh = torch.cat([(X - c) / sigma[..., None], torch.ones_like(X[..., :1])], -1)  # [b, N, 4]
    zero = torch.zeros_like(Xh)
    rows_x = torch.cat([Xh, zero, -x[..., :1] * Xh], -1)
    rows_y = torch.cat([zero, Xh, -x[..., 1:] * Xh], -1)
    A = torch.cat([rows_x, rows_y], 1) * torch.cat([w, w], 1).sqrt()[..., None]  # [b, 2N, 12]
    _, _, vh = torch.linalg.svd(A, full_matrices=False)
    P = vh[:, -1].reshape(b, 3, 4)
    # P = s [R | t] with s > 0 exactly when det(P[:, :3]) > 0 (R proper).
    P = P * torch.where(torch.linalg.det(P[:, :, :3]) < 0, -1.0, 1.0).to(P)[:, None, None]
    u, s, vt = torch.linalg.svd(P[:, :, :3])
    flip = torch.ones_like(s)
    flip[:, 2] = torch.where(torch.linalg.det(u @ vt) < 0, -1.0, 1.0).to(s)
    R = (u * flip[:, None, :]) @ vt
    t_conditioned = P[:, :, 3] / s.mean(-1, keepdim=True).clamp_min(1e-12)
    # Undo the conditioning X' = (X - c) / sigma: R X' + t' = (R X - R c + sigma t') / sigma.
    t = sigma * t_conditioned - (R @ c.transpose(-1, -2))[..., 0]
    w2c = torch.eye(4, dtype=X.dtype, device=X.device).repeat(b, 1, 1)
    w2c[:, :3, :3], w2c[:, :3, 3] = R, t
    return w2c


def _cost(X: Tensor, x: Tensor, sw: Tensor, w2c: Tensor) -> Tensor:
    return (((project(X, w2c) - x) * sw) ** 2).sum((1, 2))


def _gauss_newton_step(X: Tensor, x: Tensor, sw: Tensor, w2c: Tensor) -> Tensor:
    """``[b, 6]`` minimizer of the linearized reprojection error over ``tau`` in
    ``se3_exp(tau) @ w2c``; at ``tau = 0`` the camera point moves by ``rho + theta x cam``."""
    cam = X @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]  # [b, N, 3]
    z = cam[..., 2]
    z = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
    inv_z = 1 / z
    zero = torch.zeros_like(z)
    d_proj = torch.stack([
        torch.stack([inv_z, zero, -cam[..., 0] * inv_z * inv_z], -1),
        torch.stack([zero, inv_z, -cam[..., 1] * inv_z * inv_z], -1),
    ], -2)  # [b, N, 2, 3]
    eye = torch.eye(3, dtype=X.dtype, device=X.device).expand(*cam.shape[:2], 3, 3)
    d_cam = torch.cat([eye, -skew(cam)], -1)  # [b, N, 3, 6]
    J = (sw[..., None] * (d_proj @ d_cam)).reshape(X.shape[0], -1, 6)
    r = ((project(X, w2c) - x) * sw).reshape(X.shape[0], -1)
    H = J.transpose(-1, -2) @ J + 1e-9 * torch.eye(6, dtype=X.dtype, device=X.device)
    return -torch.linalg.solve(H, (J.transpose(-1, -2) @ r[..., None]))[..., 0]
