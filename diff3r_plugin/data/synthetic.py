"""Seeded synthetic Gaussian scenes for tests and benchmarks: Gaussians in front of a camera rig.

:func:`make_cameras` builds an RE10K-like rig (cameras on a short sideways line, all looking at
one point ahead); :func:`make_scene` puts Gaussians at random pixels of the first view with
screen-space sizes of a few pixels, the regime of pixel-aligned feed-forward Gaussians. Unlike
the ray-cast scenes of :mod:`diff3r_plugin.data.embedded`, these have no ground-truth images:
they are inputs to render and optimize, a pure function of their arguments.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..gaussians.layout import GaussianParams
from ..geometry.cameras import look_at


@dataclass
class SyntheticScene:
    params: GaussianParams
    extrinsics: Tensor  # [b, v, 4, 4]
    intrinsics: Tensor  # [b, v, 3, 3]
    near: Tensor
    far: Tensor
    image_shape: tuple[int, int]


def make_cameras(views: int, *, batch: int = 1, baseline: float = 0.3, focal: float = 0.9,
                 dtype: torch.dtype = torch.float32, target_depth: float = 4.0):
    """RE10K-like rig: cameras on a short sideways line, all looking at one point ahead."""
    xs = torch.linspace(-baseline / 2, baseline / 2, views, dtype=dtype) if views > 1 else torch.zeros(1, dtype=dtype)
    eye = torch.stack([xs, 0.03 * torch.sin(3 * xs), torch.zeros_like(xs)], -1)
    target = torch.tensor([0.0, 0.0, target_depth], dtype=dtype).expand(views, 3)
    extrinsics = look_at(eye, target)[None].expand(batch, views, 4, 4).clone()
    k = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], dtype=dtype)
    intrinsics = k.expand(batch, views, 3, 3).clone()
    near = torch.full((batch, views), 0.5, dtype=dtype)
    far = torch.full((batch, views), 100.0, dtype=dtype)
    return extrinsics, intrinsics, near, far


def make_scene(gaussians: int, size: int, views: int, *, seed: int = 0, batch: int = 1,
               sh_degree: int = 0, dtype: torch.dtype = torch.float32,
               pixel_sigma: tuple[float, float] = (0.5, 2.0), focal: float = 0.9,
               num_pose_views: int = 0) -> SyntheticScene:
    """Gaussians at uniformly random pixels of the first view, depths 2-6, with screen-space
    standard deviations of ``pixel_sigma`` pixels (the regime of pixel-aligned feed-forward
    Gaussians), random anisotropy, rotations, opacities and colours."""
    gen = torch.Generator().manual_seed(seed)
    extrinsics, intrinsics, near, far = make_cameras(views, batch=batch, dtype=dtype, focal=focal)
    u = torch.rand(batch, gaussians, 2, generator=gen, dtype=dtype) * 1.1 - 0.05
    depth = 2.0 + 4.0 * torch.rand(batch, gaussians, generator=gen, dtype=dtype)
    ray = torch.stack([(u[..., 0] - 0.5) / focal, (u[..., 1] - 0.5) / focal, torch.ones_like(depth)], -1)
    c2w = extrinsics[:, 0]
    p_cam = ray * depth[..., None]
    means = torch.einsum("bij,bgj->bgi", c2w[:, :3, :3], p_cam) + c2w[:, None, :3, 3]
    lo, hi = pixel_sigma
    sigma_px = lo + (hi - lo) * torch.rand(batch, gaussians, 3, generator=gen, dtype=dtype)
    log_scales = torch.log(sigma_px * depth[..., None] / (focal * size))
    quats = torch.randn(batch, gaussians, 4, generator=gen, dtype=dtype)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    opacity_logits = 1.5 * torch.randn(batch, gaussians, generator=gen, dtype=dtype)
    d = (sh_degree + 1) ** 2
    sh = 0.6 * torch.randn(batch, gaussians, 3, d, generator=gen, dtype=dtype)
    sh[..., 1:] *= 0.2
    pose = torch.zeros(batch, num_pose_views, 6, dtype=dtype)
    params = GaussianParams(means, log_scales, quats, opacity_logits, sh[..., :1], sh[..., 1:], pose)
    return SyntheticScene(params, extrinsics, intrinsics, near, far, (size, size))
