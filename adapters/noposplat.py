"""NoPoSplat (cvg/NoPoSplat): ``EncoderNoPoSplat`` / ``EncoderNoPoSplatMulti``, pose-free.

* SH basis ``"3dgs"`` (the w-pose rasterizer uses stock 3DGS SH), SH degree 4 (degree 4 passes
  through TTO untouched), harmonics are *not* rotated: the canonical frame is the camera frame
  of context view 0.
* The encoder's data shim (``apply_normalize_shim``) overwrites ``context["image"]`` with
  ``(x - mean) / std`` (0.5 / 0.5 by default, read from ``encoder.cfg.input_mean/input_std``
  at wrap time); :meth:`NoPoSplatAdapter.normalize_images` maps it back to [0, 1]. Calling the
  wrapped encoder on a batch that did not go through the shim is therefore wrong.
* Context poses: view 0 is the identity. The other context poses are **estimated** from the
  prediction (``pose_source="pnp"``, default): the encoder emits one Gaussian per pixel, view
  major, so the means of view ``j``'s pixels and the pixel centres give 2D-3D matches; a
  weighted calibrated DLT (Hartley-normalized, SVD, projected onto SO(3)) followed by
  Gauss-Newton on the reprojection error gives the camera (the upstream PoseEvaluator uses
  OpenCV PnP-RANSAC on the same matches). With ``diff3r.optimize_pose`` (default) the layout
  carries one se(3) delta per non-reference view and TTO refines the estimate jointly with the
  Gaussians. ``pose_source="batch"`` uses the (ground-truth) context extrinsics of the batch.
  The initial and refined poses are kept on ``encoder.diff3r.last_initial_poses`` /
  ``last_poses``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from diff3r_plugin.errors import ConfigError, ShapeError
from diff3r_plugin.geometry.cameras import invert_rigid, se3_exp
from diff3r_plugin.gaussians.layout import GaussianParams

from .base import Adapter, Diff3RState
from .registry import register_adapter

if TYPE_CHECKING:
    from diff3r_plugin.layer import ContextViews

__all__ = ["NoPoSplatAdapter", "estimate_pose_pnp", "init_point_depth", "pixel_centers"]


def pixel_centers(h: int, w: int, *, dtype=torch.float64, device=None) -> Tensor:
    """Normalized pixel centres ``[(h w), 2]`` (x, y in (0, 1)), row-major like the encoders."""
    ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], -1).reshape(-1, 2)


def _project(w2c: Tensor, points: Tensor) -> Tensor:
    """Normalized camera coordinates ``[b, N, 2]`` of ``points [b, N, 3]``."""
    cam = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]
    z = cam[..., 2:]
    z = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
    return cam[..., :2] / z


def estimate_pose_pnp(points: Tensor, pixels: Tensor, intrinsics: Tensor, weights: Optional[Tensor] = None,
                      *, refine_iters: int = 10) -> Tensor:
    """Camera-to-world pose of a calibrated camera from 2D-3D matches.

    Args:
        points: ``[b, N, 3]`` points in the reference (world) frame.
        pixels: ``[N, 2]`` or ``[b, N, 2]`` normalized image coordinates in (0, 1).
        intrinsics: ``[b, 3, 3]`` normalized K.
        weights: ``[b, N]`` non-negative match weights (e.g. an opacity mask), or None.
        refine_iters: Gauss-Newton iterations on the reprojection error after the DLT.

    Returns:
        ``[b, 4, 4]`` OpenCV camera-to-world matrices (float64 -> the dtype of ``points``).
    """
    b, n = points.shape[:2]
    if n < 6:
        raise ShapeError(f"PnP needs at least 6 matches, got {n}")
    X = points.detach().double()
    K = intrinsics.detach().double()
    px = pixels.detach().double().to(X.device)
    if px.ndim == 2:
        px = px.expand(b, -1, -1)
    hom = torch.cat([px, torch.ones_like(px[..., :1])], -1)
    rays = hom @ torch.linalg.inv(K).transpose(-1, -2)
    x = rays[..., :2] / rays[..., 2:]
    w = torch.ones(b, n, dtype=X.dtype, device=X.device) if weights is None else weights.detach().double()
    # Hartley normalization of the 3D points.
    wsum = w.sum(1, keepdim=True).clamp_min(1e-12)
    c = (w[..., None] * X).sum(1, keepdim=True) / wsum[..., None]
    sigma = ((w * ((X - c) ** 2).sum(-1)).sum(1, keepdim=True) / wsum).sqrt().clamp_min(1e-12)
    Xn = (X - c) / sigma[..., None]
    Xh = torch.cat([Xn, torch.ones_like(Xn[..., :1])], -1)  # [b, N, 4]
    zero = torch.zeros_like(Xh)
    r1 = torch.cat([Xh, zero, -x[..., :1] * Xh], -1)
    r2 = torch.cat([zero, Xh, -x[..., 1:] * Xh], -1)
    A = torch.cat([r1, r2], 1) * torch.cat([w, w], 1).sqrt()[..., None]  # [b, 2N, 12]
    _, _, vh = torch.linalg.svd(A.transpose(-1, -2) @ A)
    P = vh[:, -1].reshape(b, 3, 4)
    M = P[:, :, :3]
    det = torch.linalg.det(M)
    P = P * torch.where(det < 0, -1.0, 1.0)[:, None, None]
    M = P[:, :, :3]
    u, s, vt = torch.linalg.svd(M)
    R = u @ vt
    fix = torch.linalg.det(R) < 0
    if bool(fix.any()):
        u = u.clone()
        u[fix, :, 2] *= -1
        R = u @ vt
    scale = s.mean(-1).clamp_min(1e-12)
    t_n = P[:, :, 3] / scale[:, None]
    t = sigma * t_n - (R @ c.transpose(-1, -2))[..., 0]
    w2c = torch.eye(4, dtype=X.dtype, device=X.device).repeat(b, 1, 1)
    w2c[:, :3, :3], w2c[:, :3, 3] = R, t
    # Gauss-Newton on the reprojection error (6-dof left-multiplied se(3) delta).
    sw = w.sqrt()[..., None]

    def residual(pose: Tensor) -> Tensor:
        return ((_project(pose, X) - x) * sw).reshape(b, -1)

    eye6 = torch.eye(6, dtype=X.dtype, device=X.device)
    for _ in range(refine_iters):
        r0 = residual(w2c)
        eps = 1e-6
        cols = []
        for k in range(6):
            d = (eps * eye6[k]).expand(b, 6)
            cols.append((residual(se3_exp(d) @ w2c) - residual(se3_exp(-d) @ w2c)) / (2 * eps))
        J = torch.stack(cols, -1)  # [b, 2N, 6]
        H = J.transpose(-1, -2) @ J + 1e-9 * eye6
        step = -torch.linalg.solve(H, (J.transpose(-1, -2) @ r0[..., None]))[..., 0]
        cand = se3_exp(step) @ w2c
        better = (residual(cand) ** 2).sum(1) <= (r0 ** 2).sum(1)
        w2c = torch.where(better[:, None, None], cand, w2c)
    return invert_rigid(w2c).to(points.dtype)


@register_adapter("noposplat")
class NoPoSplatAdapter(Adapter):
    name = "noposplat"
    sh_basis = "3dgs"
    pose_free = True
    default_sh_degree = 4
    encoder_class_patterns = (r"^EncoderNoPoSplat", r"NoPoSplat")

    def __init__(self, background: Optional[Sequence[float]] = None, *, input_mean: Any = 0.5,
                 input_std: Any = 0.5, pose_source: str = "pnp", opacity_threshold: float = 0.3) -> None:
        super().__init__(background)
        if pose_source not in ("pnp", "batch"):
            raise ConfigError(f"noposplat: pose_source must be 'pnp' or 'batch', got {pose_source!r}")
        self.input_mean, self.input_std = input_mean, input_std
        self.pose_source = pose_source
        self.opacity_threshold = opacity_threshold

    def configure_from_encoder(self, encoder: Any) -> None:
        cfg = getattr(encoder, "cfg", None)
        for attr in ("input_mean", "input_std"):
            value = getattr(cfg, attr, None)
            if value is not None:
                setattr(self, attr, value)

    def encoder_num_context_views(self, encoder: Any) -> int:
        return 3 if "Multi" in type(encoder).__name__ else 2

    def normalize_images(self, images: Tensor) -> Tensor:
        """Undo ``apply_normalize_shim``: ``x * std + mean`` (``x * 0.5 + 0.5`` by default)."""
        mean = torch.as_tensor(self.input_mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.input_std, dtype=images.dtype, device=images.device)
        if mean.ndim == 1:
            mean, std = mean[:, None, None], std[:, None, None]
        return images * std + mean

    def estimate_context_poses(self, views: ContextViews, gaussians: Any) -> Tensor:
        """``[b, v, 4, 4]`` context c2w: identity for view 0, PnP on the predicted means otherwise."""
        b, v = views.batch, views.num_views
        h, w = views.image_shape
        means = gaussians.means.detach()
        g = means.shape[1]
        if g % (v * h * w):
            raise ShapeError(
                f"noposplat: {g} Gaussians are not pixel-aligned with {v} context views of {h}x{w} "
                "(expected a multiple of v*h*w); cannot estimate the context poses by PnP. Pass "
                "pose_source='batch' to use the batch extrinsics")
        spp = g // (v * h * w)
        pts = means.reshape(b, v, h * w, spp, 3).mean(3)
        opac = gaussians.opacities.detach().reshape(b, v, h * w, spp).amax(3)
        pix = pixel_centers(h, w, device=means.device)
        out = torch.eye(4, dtype=views.extrinsics.dtype, device=means.device).repeat(b, v, 1, 1)
        for j in range(1, v):
            wts = (opac[:, j] > self.opacity_threshold).double()
            few = wts.sum(1) < 6
            wts = torch.where(few[:, None], torch.ones_like(wts), wts)
            c2w = estimate_pose_pnp(pts[:, j], pix, views.intrinsics[:, j], wts)
            ok = torch.isfinite(c2w).all(-1).all(-1)
            if not bool(ok.all()):
                warnings.warn("noposplat: PnP failed for some scene(s); using the batch extrinsics",
                              RuntimeWarning, stacklevel=2)
                c2w = torch.where(ok[:, None, None], c2w, views.extrinsics[:, j].to(c2w))
            out[:, j] = c2w.to(out.dtype)
        return out

    def prepare_views(self, views: ContextViews, gaussians: Any, params: GaussianParams,
                      state: Optional[Diff3RState] = None) -> ContextViews:
        if self.pose_source == "batch":
            extr = views.extrinsics.detach().clone()
            extr[:, 0] = torch.eye(4, dtype=extr.dtype, device=extr.device)
        else:
            extr = self.estimate_context_poses(views, gaussians)
        from diff3r_plugin.layer import ContextViews

        return ContextViews(views.images, extr, views.intrinsics, views.near, views.far,
                            views.background, views.sh_basis, views.weights)


def init_point_depth(encoder: nn.Module, depth: float) -> List[str]:
    """Set NoPoSplat's point-head output bias so that untrained points lie ``depth`` ahead.

    NoPoSplat regresses each pixel's point ``xyz`` in the reference camera frame as
    ``u * expm1(|o|)`` with ``o`` the last 1x1 convolution's first three channels and
    ``u = o / |o|`` (DUSt3R's ``depth_mode=('exp', -inf, inf)``). With random weights ``o`` is
    small, so every point lies within a few hundredths of the camera centre, in front of the
    near-plane cull (upstream's rasterizer culls ``z <= 0.2`` after its scale-invariant
    rescaling, the plugin's renderer likewise): nothing is drawn and the photometric loss has no
    gradient. Setting the bias of those channels to ``(0, 0, log1p(depth))`` moves the untrained
    points to about ``depth`` in front of the reference camera (clustered near the optical axis:
    the network has not learnt rays), so renders are non-empty and gradients flow. This is an
    initialization for plumbing checks with random weights, not a trained model; it changes
    values, never ``state_dict`` keys. Returns the names of the changed parameters.
    """
    import math

    if depth <= 0:
        raise ConfigError(f"point_depth_init must be > 0, got {depth}")
    changed = []
    for name in ("downstream_head1", "downstream_head2"):
        head = getattr(encoder, name, None)
        seq = getattr(getattr(head, "dpt", None), "head", None)
        last = None
        if isinstance(seq, nn.Sequential) and isinstance(seq[-1], nn.Conv2d) and seq[-1].bias is not None:
            last = seq[-1]
        if last is None or last.bias.numel() < 3:
            raise ShapeError(f"init_point_depth: {type(encoder).__name__} has no NoPoSplat point head '{name}'"
                             " (dpt.head[-1] with a bias of >= 3 channels)")
        with torch.no_grad():
            last.bias[:3] = torch.tensor([0.0, 0.0, math.log1p(depth)], dtype=last.bias.dtype)
        changed.append(f"{name}.dpt.head.{len(seq) - 1}.bias[:3]")
    return changed
