"""Two tiny built-in encoders that train on a laptop CPU in minutes (64x64 or smaller).

Both take the upstream ``batch["context"]`` dict (``image [b, v, 3, h, w]`` in [0, 1],
``extrinsics`` OpenCV c2w, normalized ``intrinsics``, ``near``, ``far``) and return an
:class:`EncoderOutput`: upstream-format Gaussians (``means [b, g, 3]``, ``covariances
[b, g, 3, 3]``, ``harmonics [b, g, 3, d_sh]``, ``opacities [b, g]``, one Gaussian per context
pixel, view-major), per-Gaussian features for the uncertainty head, and the context cameras the
TTO layer should use.

* :class:`TinyPoseGivenEncoder` (MVSplat-style): a small shared CNN per view, a plane-sweep
  correlation volume against the other context view(s) on ``num_depths`` planes uniform in
  inverse depth between near and far, a soft-argmin depth per pixel, and a per-pixel Gaussian
  head (scale relative to the pixel footprint, rotation, opacity, colour residual on the pixel).
* :class:`TinyPoseFreeEncoder` (NoPoSplat-style): sees both images, predicts per-pixel 3D points
  of both views in the frame of context view 0 (view 0 = identity; the other extrinsics are
  never read, only the intrinsics), and estimates the relative pose of view 1 from its points
  and pixel rays by PnP (:func:`~diff3r_plugin.geometry.pnp.solve_pnp`). That pose is refined
  jointly with the Gaussians in the TTO (layout ``pose`` group, ``num_pose_views = 1``). Use :func:`to_relative_frame` on the batch first (context 0 at the
  identity, unit baseline, as NoPoSplat's ``relative_pose`` + ``make_baseline_1``).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import ShapeError
from ..gaussians.layout import build_covariance
from ..geometry.cameras import invert_rigid, se3_exp
from ..geometry.pnp import solve_pnp
from ..geometry.projection import pixel_rays
from ..geometry.sh import num_coeffs, rgb_to_sh
from ..uncertainty.head import NUM_GAUSSIAN_FEATURES, features_from_gaussians

__all__ = ["EncoderOutput", "TinyPoseGivenEncoder", "TinyPoseFreeEncoder", "to_relative_frame"]


@dataclass
class EncoderOutput:
    """What a tiny encoder returns (upstream ``Gaussians`` fields + extras for Diff3R)."""

    means: Tensor
    covariances: Tensor
    harmonics: Tensor
    opacities: Tensor
    features: Tensor                 # [b, g, k] per-Gaussian descriptor for the head
    context_extrinsics: Tensor       # [b, v, 4, 4] cameras to run the TTO with
    num_pose_views: int = 0
    sh_basis: str = "e3nn"
    extras: dict = field(default_factory=dict)

    def gaussians(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.means, self.covariances, self.harmonics, self.opacities


def _conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU())


class _Trunk(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.net = nn.Sequential(_conv(cin, width), _conv(width, width), _conv(width, width),
                                 nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _GaussianHead(nn.Module):
    """Per-pixel scale (3), rotation (4), opacity (1) and SH residual (3 * d_sh)."""

    def __init__(self, cin: int, width: int, d_sh: int):
        super().__init__()
        self.d_sh = d_sh
        self.net = nn.Sequential(_conv(cin, width), nn.Conv2d(width, 8 + 3 * d_sh, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, image: Tensor, depth: Tensor, ray: Tensor, c2w: Tensor,
                intrinsics: Tensor, scale_init: float):
        """x [n, c, h, w]; image [n, 3, h, w]; depth [n, h*w]; ray [n, h*w, 3]; c2w [n, 4, 4]."""
        n, _, h, w = x.shape
        out = rearrange(self.net(x), "n c h w -> n (h w) c")
        # Pixel footprint at the predicted depth (normalized focal -> pixels).
        fx = intrinsics[:, 0, 0][:, None] * w
        footprint = depth / fx
        scales = footprint[..., None] * scale_init * torch.exp(out[..., 0:3].clamp(-3, 3))
        quats = out[..., 3:7] + torch.tensor([1.0, 0, 0, 0], dtype=x.dtype, device=x.device)
        opac = torch.sigmoid(out[..., 7] + 2.0)
        rgb = rearrange(image, "n c h w -> n (h w) c")
        sh = rearrange(out[..., 8:], "n p (c k) -> n p c k", c=3) * 0.5
        sh = sh + F.pad(rgb_to_sh(rgb)[..., None], (0, self.d_sh - 1))
        # Camera-frame (z = depth) point -> world.
        pc = ray * depth[..., None]
        means = pc @ c2w[:, :3, :3].transpose(-1, -2) + c2w[:, None, :3, 3]
        log_scales = scales.clamp_min(1e-8).log()
        # Rotations are predicted in the camera frame; rotate into the world.
        cov_cam = build_covariance(log_scales, quats)
        rot = c2w[:, None, :3, :3]
        cov = rot @ cov_cam @ rot.transpose(-1, -2)
        return means, cov, sh, opac


def _flatten_views(t: Tensor) -> Tensor:
    return rearrange(t, "b v ... -> (b v) ...")


class TinyPoseGivenEncoder(nn.Module):
    """MVSplat-style tiny encoder: CNN + plane-sweep correlation + per-pixel Gaussians."""

    pose_free = False

    def __init__(self, width: int = 24, num_depths: int = 16, sh_degree: int = 0,
                 scale_init: float = 0.8):
        super().__init__()
        self.init_kwargs = dict(width=width, num_depths=num_depths, sh_degree=sh_degree,
                                scale_init=scale_init)
        self.width, self.num_depths, self.sh_degree = width, num_depths, sh_degree
        self.scale_init = scale_init
        self.trunk = _Trunk(3, width)
        self.depth_net = nn.Sequential(_conv(width + num_depths, width),
                                       nn.Conv2d(width, num_depths, 3, padding=1))
        self.gauss = _GaussianHead(width + num_depths + 3, width, num_coeffs(sh_degree))

    @property
    def num_features(self) -> int:
        return NUM_GAUSSIAN_FEATURES + 2

    def forward(self, context: dict) -> EncoderOutput:
        img = context["image"]
        extr, intr = context["extrinsics"], context["intrinsics"]
        near, far = context["near"], context["far"]
        b, v, _, h, w = img.shape
        if v < 2:
            raise ShapeError("TinyPoseGivenEncoder needs >= 2 context views for its cost volume")
        feat = self.trunk(_flatten_views(img)).reshape(b, v, self.width, h, w)
        feat_n = F.normalize(feat, dim=2)
        d = self.num_depths
        frac = torch.linspace(0, 1, d, dtype=img.dtype, device=img.device)
        inv = (1 / near)[..., None] * (1 - frac) + (1 / far)[..., None] * frac  # [b, v, d]
        depths = 1 / inv
        rays = pixel_rays(intr, h, w)  # [b, v, hw, 3]
        w2c = invert_rigid(extr)
        cost = img.new_zeros(b, v, d, h, w)
        for i in range(v):
            pc = rays[:, i, None] * depths[:, i, :, None, None]  # [b, d, hw, 3]
            world = pc @ extr[:, i, None, :3, :3].transpose(-1, -2) + extr[:, i, None, None, :3, 3]
            for j in range(v):
                if j == i:
                    continue
                cj = world @ w2c[:, j, None, :3, :3].transpose(-1, -2) + w2c[:, j, None, None, :3, 3]
                z = cj[..., 2:3].clamp_min(1e-6)
                uv = (cj[..., :2] / z) * intr[:, j, None, None, [0, 1], [0, 1]] + intr[:, j, None, None, :2, 2]
                grid = (2 * uv - 1).reshape(b, d * h, w, 2)
                warped = F.grid_sample(feat_n[:, j], grid, align_corners=False, padding_mode="zeros")
                warped = warped.reshape(b, self.width, d, h, w)
                cost[:, i] += (warped * feat_n[:, i, :, None]).sum(1) / (v - 1)
        x = torch.cat([feat, cost], 2)
        logits = self.depth_net(_flatten_views(x)).reshape(b, v, d, h, w) + 8 * cost
        prob = logits.softmax(2)
        inv_depth = (prob * inv[..., None, None]).sum(2)  # soft-argmin in inverse depth
        depth = (1 / inv_depth).reshape(b * v, h * w)
        conf = prob.amax(2).reshape(b * v, h * w)
        gx = torch.cat([x, img], 2)
        means, cov, sh, opac = self.gauss(_flatten_views(gx), _flatten_views(img), depth,
                                          _flatten_views(rays), _flatten_views(extr),
                                          _flatten_views(intr), self.scale_init)
        g = v * h * w
        means, cov = means.reshape(b, g, 3), cov.reshape(b, g, 3, 3)
        sh, opac = sh.reshape(b, g, 3, -1), opac.reshape(b, g)
        extra = torch.stack([conf.reshape(b, g), (depth.reshape(b, g) /
                                                  near.repeat_interleave(h * w, 1)).log()], -1)
        return _finish(means, cov, sh, opac, img, extr, extr, 0, "e3nn", extra, {"depth": depth})


def _finish(means, cov, sh, opac, img, feat_extr, ctx_extr, num_pose, basis, extra, extras):
    from ..gaussians.layout import from_upstream
    with torch.no_grad():
        params, _ = from_upstream(means.detach(), cov.detach(), sh.detach(), opac.detach(),
                                  on_invalid="project")
    # The descriptor is computed from the predicted Gaussians (gradients reach the encoder via
    # the extra terms only; the geometry descriptor is detached to keep the head's input stable).
    feats = features_from_gaussians(params, img, feat_extr, extra=extra)
    return EncoderOutput(means, cov, sh, opac, feats, ctx_extr, num_pose, basis, extras)


# --------------------------------------------------------------------------------------------
# Pose-free
# --------------------------------------------------------------------------------------------


def to_relative_frame(batch: dict, baseline_one: bool = True) -> dict:
    """NoPoSplat's canonical frame: every c2w left-multiplied by ``inv(c2w of context 0)`` and,
    with ``baseline_one``, translations, near and far divided by the context baseline."""
    ref = invert_rigid(batch["context"]["extrinsics"][:, :1])  # [b, 1, 4, 4]
    out = {k: v for k, v in batch.items() if k not in ("context", "target")}
    ctx_rel = ref @ batch["context"]["extrinsics"]
    scale = torch.ones_like(ctx_rel[:, 0, 0, 0])
    if baseline_one:
        scale = (ctx_rel[:, -1, :3, 3]).norm(dim=-1).clamp_min(1e-6)
    for part in ("context", "target"):
        views = dict(batch[part])
        e = ref @ views["extrinsics"]
        e = e.clone()
        e[..., :3, 3] = e[..., :3, 3] / scale[:, None, None]
        views["extrinsics"] = e
        views["near"] = views["near"] / scale[:, None]
        views["far"] = views["far"] / scale[:, None]
        out[part] = views
    out["scale"] = scale
    return out


class TinyPoseFreeEncoder(nn.Module):
    """NoPoSplat-style tiny encoder (pose-free: only intrinsics and the images are read).

    For each view, a CNN sees the view and the other context view (channel-stacked) and
    predicts depth along its own pixel rays (in ``[near, far]``); a global head predicts the
    relative pose ``T_01`` (c2w of view 1 in the frame of view 0) from both images, and view 1's
    points are placed in the frame of view 0 as ``T_01 (depth * ray) + offset`` (a small
    per-pixel correction). The pose of view 1 used for the TTO is then re-estimated from those
    points and view 1's pixel rays by :func:`~diff3r_plugin.geometry.pnp.solve_pnp` (exactly
    NoPoSplat's evaluation route: PnP on the predicted means) and refined by the layer's ``pose`` group.
    """

    pose_free = True

    def __init__(self, width: int = 24, sh_degree: int = 0, scale_init: float = 0.8,
                 init_baseline: tuple[float, float, float] = (1.0, 0.0, 0.0)):
        super().__init__()
        self.init_kwargs = dict(width=width, sh_degree=sh_degree, scale_init=scale_init,
                                init_baseline=tuple(init_baseline))
        self.width, self.sh_degree, self.scale_init = width, sh_degree, scale_init
        self.trunk = _Trunk(6, width)
        self.depth_head = nn.Conv2d(width, 1, 3, padding=1)
        self.offset_head = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.offset_head.weight)
        nn.init.zeros_(self.offset_head.bias)
        self.pose_head = nn.Linear(2 * width, 6)
        nn.init.zeros_(self.pose_head.weight)
        with torch.no_grad():
            self.pose_head.bias.zero_()
            self.pose_head.bias[:3] = torch.tensor(init_baseline)
        self.gauss = _GaussianHead(width + 3, width, num_coeffs(sh_degree))

    @property
    def num_features(self) -> int:
        return NUM_GAUSSIAN_FEATURES + 1

    def forward(self, context: dict) -> EncoderOutput:
        img, intr = context["image"], context["intrinsics"]
        near, far = context["near"], context["far"]
        b, v, _, h, w = img.shape
        if v != 2:
            raise ShapeError(f"TinyPoseFreeEncoder handles 2 context views, got {v}")
        pair = torch.cat([img, img.flip(1)], 2)  # view i sees (i, other)
        feat = self.trunk(_flatten_views(pair))  # [b*v, c, h, w]
        s = torch.sigmoid(self.depth_head(feat) - 1.0).reshape(b, v, h * w)
        inv = (1 / near)[..., None] * (1 - s) + (1 / far)[..., None] * s
        depth = 1 / inv
        rays = pixel_rays(intr, h, w)
        pooled = feat.reshape(b, v, self.width, -1).mean(-1).reshape(b, v * self.width)
        tau = self.pose_head(pooled)
        # se3_exp gives a w2c-style transform; use it as the c2w of view 1 in frame 0.
        t01 = se3_exp(tau)
        eye = torch.eye(4, dtype=img.dtype, device=img.device).expand(b, 4, 4)
        pred_c2w = torch.stack([eye, t01], 1)
        offset = rearrange(self.offset_head(feat), "(b v) c h w -> b v (h w) c", b=b)
        pts_cam = rays * depth[..., None]
        pts = pts_cam @ pred_c2w[:, :, :3, :3].transpose(-1, -2) + pred_c2w[:, :, None, :3, 3]
        pts = pts + 0.05 * offset * depth[..., None]
        pts[:, 0] = pts_cam[:, 0]  # view 0 is the reference frame: no offset there
        # PnP for view 1 from its predicted points (in frame 0) and its pixel rays.
        c2w1 = invert_rigid(solve_pnp(pts[:, 1], rays[:, 1, :, :2]))
        ctx_extr = torch.stack([eye, c2w1], 1).contiguous()
        # Gaussians: depth along the view's own ray = z in the estimated camera frame.
        x = torch.cat([feat, _flatten_views(img)], 1)
        cam_depth = torch.stack([pts[:, 0, :, 2],
                                 ((pts[:, 1] - ctx_extr[:, 1, None, :3, 3]) @ ctx_extr[:, 1, :3, :3])[..., 2]], 1)
        cam_depth = cam_depth.clamp_min(1e-4)
        means, cov, sh, opac = self.gauss(x, _flatten_views(img), _flatten_views(cam_depth),
                                          _flatten_views(rays), _flatten_views(ctx_extr),
                                          _flatten_views(intr), self.scale_init)
        g = v * h * w
        # Use the predicted points themselves as means (NoPoSplat: means = pts3d).
        means = pts.reshape(b, g, 3)
        cov, sh, opac = cov.reshape(b, g, 3, 3), sh.reshape(b, g, 3, -1), opac.reshape(b, g)
        extra = (depth.reshape(b, g) / near.repeat_interleave(h * w, 1)).log()[..., None]
        return _finish(means, cov, sh, opac, img, ctx_extr, ctx_extr, 1, "3dgs", extra,
                       {"pred_c2w": pred_c2w, "depth": depth})
