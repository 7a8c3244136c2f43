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

import warnings
from typing import Any, List, Optional, Sequence

import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor, nn

from diff3r_plugin.errors import ConfigError, ShapeError
from diff3r_plugin.geometry.cameras import invert_rigid
from diff3r_plugin.geometry.pnp import solve_pnp
from diff3r_plugin.geometry.projection import pixel_rays
from diff3r_plugin.gaussians.layout import GaussianParams
from diff3r_plugin.layer.views import ContextViews

from .base import Adapter, Diff3RState
from .registry import register_adapter

__all__ = ["NoPoSplatAdapter", "init_point_depth"]


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

    def normalize_images(
        self, images: Float[Tensor, "batch view 3 height width"]
    ) -> Float[Tensor, "batch view 3 height width"]:
        """Undo ``apply_normalize_shim``: ``x * std + mean`` (``x * 0.5 + 0.5`` by default)."""
        mean = torch.as_tensor(self.input_mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.input_std, dtype=images.dtype, device=images.device)
        if mean.ndim == 1:
            mean, std = mean[:, None, None], std[:, None, None]
        return images * std + mean

    def estimate_context_poses(self, views: ContextViews, gaussians: Any
                               ) -> Float[Tensor, "batch view 4 4"]:
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
        pts = reduce(means, "b (v p s) c -> b v p c", "mean", v=v, p=h * w)
        opac = reduce(gaussians.opacities.detach(), "b (v p s) -> b v p", "max", v=v, p=h * w)
        out = torch.eye(4, dtype=views.extrinsics.dtype, device=means.device).repeat(b, v, 1, 1)
        for j in range(1, v):
            wts = (opac[:, j] > self.opacity_threshold).double()
            few = wts.sum(1) < 6
            wts = torch.where(few[:, None], torch.ones_like(wts), wts)
            rays = pixel_rays(views.intrinsics[:, j].detach().double().to(means.device), h, w)
            c2w = invert_rigid(solve_pnp(pts[:, j], rays[..., :2], wts))
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
