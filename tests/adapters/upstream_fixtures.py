"""Small stand-ins shaped like the upstream repos (written for these tests, no upstream code).

* :class:`Gaussians`: like ``src.model.types.Gaussians``; its ``__init__`` is type-checked by
  jaxtyping + beartype (as the upstream import hook does), so shape-inconsistent fields raise.
* :func:`decode`: a jaxtyped function annotated ``gaussians: Gaussians`` (like
  ``DecoderSplattingCUDA.forward``): a duck-typed look-alike is rejected.
* Encoders with each upstream ``forward`` signature and class name, producing one (pixelSplat:
  ``spp``) Gaussian per pixel from a conv head, a ``get_data_shim`` and a nested module tree so
  that state_dict keys look like upstream's (``backbone.*``, ``gaussian_head.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor, nn

from diff3r_plugin.geometry.projection import pixel_rays
from diff3r_plugin.geometry.sh import rgb_to_sh


@jaxtyped(typechecker=beartype)
@dataclass
class Gaussians:
    means: Float[Tensor, "batch gaussian dim"]
    covariances: Float[Tensor, "batch gaussian dim dim"]
    harmonics: Float[Tensor, "batch gaussian 3 d_sh"]
    opacities: Float[Tensor, "batch gaussian"]


@jaxtyped(typechecker=beartype)
def decode(gaussians: Gaussians) -> Float[Tensor, "batch"]:
    """Type-checked consumer (stands in for the upstream decoder / loss)."""
    return gaussians.means.sum((1, 2))


# ----------------------------------------------------------------------------- geometry helpers
def look_at_c2w(eye, target=(0.0, 0.0, 3.0)) -> Tensor:
    eye = torch.tensor(eye, dtype=torch.float32)
    target = torch.tensor(target, dtype=torch.float32)
    z = F.normalize(target - eye, dim=0)
    down = torch.tensor([0.0, 1.0, 0.0])  # OpenCV: +y points down
    x = F.normalize(torch.cross(down, z, dim=0), dim=0)
    y = torch.cross(z, x, dim=0)
    m = torch.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, eye
    return m


def make_context(b: int = 1, v: int = 2, h: int = 8, w: int = 8, seed: int = 0) -> dict:
    """An upstream-shaped context batch (images in [0, 1], OpenCV c2w, normalized K)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, v, 3, h, w, generator=g) * 0.6 + 0.2
    eyes = [(-0.3 + 0.6 * i / max(v - 1, 1), 0.05 * i, 0.0) for i in range(v)]
    extr = torch.stack([look_at_c2w(e) for e in eyes])[None].repeat(b, 1, 1, 1)
    intr = torch.tensor([[0.9, 0.0, 0.5], [0.0, 0.9, 0.5], [0.0, 0.0, 1.0]]).expand(b, v, 3, 3).clone()
    return {"image": images, "extrinsics": extr, "intrinsics": intr,
            "near": torch.full((b, v), 1.0), "far": torch.full((b, v), 100.0),
            "index": torch.arange(v)[None].repeat(b, 1)}


# ----------------------------------------------------------------------------- encoders
class _Backbone(nn.Module):
    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)  # buffers in the state_dict, like upstream

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv1(x)))


class _PixelEncoder(nn.Module):
    """Shared body: per-pixel Gaussians along the context rays (world = batch extrinsics)."""

    sh_degree_default = 4
    spp = 1

    def __init__(self, sh_degree: Optional[int] = None, width: int = 8) -> None:
        super().__init__()
        sh = self.sh_degree_default if sh_degree is None else sh_degree
        self.cfg = SimpleNamespace(name=type(self).__name__,
                                   gaussian_adapter=SimpleNamespace(sh_degree=sh),
                                   input_mean=0.5, input_std=0.5)
        self.d_sh = (sh + 1) ** 2
        self.backbone = _Backbone(3, width)
        self.gaussian_head = nn.Conv2d(width, self.spp * (1 + 3 + 1 + 3 * self.d_sh), 1)
        mask = torch.cat([torch.full(((l * 2 + 1),), 0.1 * 0.25 ** l) for l in range(sh + 1)])
        self.register_buffer("sh_mask", mask, persistent=False)
        self.calls: list = []

    def images_for_network(self, context: dict) -> Tensor:
        return context["image"]

    def camera_frames(self, context: dict) -> Tensor:
        return context["extrinsics"]

    def predict(self, context: dict) -> Gaussians:
        img = self.images_for_network(context)
        b, v, _, h, w = img.shape
        out = self.gaussian_head(self.backbone(img.flatten(0, 1)))  # [bv, spp*c, h, w]
        out = out.reshape(b, v, self.spp, -1, h * w).permute(0, 1, 4, 2, 3)  # b v hw spp c
        depth = 3.0 + 0.5 * torch.tanh(out[..., 0]) + 0.1 * torch.arange(self.spp)
        scale = 0.02 + 0.06 * torch.sigmoid(out[..., 1:4])
        opac = torch.sigmoid(out[..., 4])
        sh = out[..., 5:].reshape(b, v, h * w, self.spp, 3, self.d_sh) * self.sh_mask
        rgb = context_rgb(img, self).reshape(b, v, 3, h * w).permute(0, 1, 3, 2)
        sh = sh.clone()
        sh[..., 0] = sh[..., 0] + rgb_to_sh(rgb)[:, :, :, None]
        c2w = self.camera_frames(context)
        rays = pixel_rays(context["intrinsics"], h, w)  # b v hw 3
        cam = rays[:, :, :, None] * depth[..., None]
        R, t = c2w[:, :, None, None, :3, :3], c2w[:, :, None, None, :3, 3]
        means = (R @ cam[..., None])[..., 0] + t
        cov_cam = torch.diag_embed(scale ** 2)
        cov = R @ cov_cam @ R.transpose(-1, -2)
        n = v * h * w * self.spp
        return Gaussians(means.reshape(b, n, 3), cov.reshape(b, n, 3, 3),
                         sh.reshape(b, n, 3, self.d_sh), opac.reshape(b, n))

    def get_data_shim(self):
        def data_shim(batch: dict) -> dict:
            batch = dict(batch)
            batch["shim_applied"] = type(self).__name__
            return batch
        return data_shim


def context_rgb(img: Tensor, enc: Any) -> Tensor:
    return img * 0.5 + 0.5 if isinstance(enc, EncoderNoPoSplat) else img


class EncoderCostVolume(_PixelEncoder):  # MVSplat
    def forward(self, context: dict, global_step: int, deterministic: bool = False,
                visualization_dump: Optional[dict] = None, scene_names: Optional[list] = None) -> Gaussians:
        self.calls.append(dict(global_step=global_step, deterministic=deterministic,
                               visualization_dump=visualization_dump, scene_names=scene_names))
        g = self.predict(context)
        if visualization_dump is not None:
            visualization_dump["depth"] = "filled"
        return g


class EncoderEpipolar(_PixelEncoder):  # pixelSplat: 3 Gaussians per pixel
    spp = 3

    def forward(self, context: dict, global_step: int, deterministic: bool = False,
                visualization_dump: Optional[dict] = None) -> Gaussians:
        self.calls.append(dict(global_step=global_step, deterministic=deterministic,
                               visualization_dump=visualization_dump))
        return self.predict(context)


class EncoderDepthSplat(_PixelEncoder):  # DepthSplat: degree 2, dict output, b*K in training
    sh_degree_default = 2

    def __init__(self, num_scales: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        self.num_scales = num_scales

    def forward(self, context: dict, global_step: int, deterministic: bool = False,
                visualization_dump: Optional[dict] = None, scene_names: Optional[list] = None) -> dict:
        self.calls.append(dict(global_step=global_step, deterministic=deterministic))
        g = self.predict(context)
        b, v, _, h, w = context["image"].shape
        depths = g.means.new_ones(b, v, h, w)
        if self.training and self.num_scales > 1:
            inter = Gaussians(g.means * 1.01, g.covariances, g.harmonics, g.opacities)
            g = Gaussians(*(torch.cat([getattr(inter, f), getattr(g, f)], 0)
                            for f in ("means", "covariances", "harmonics", "opacities")))
        return {"gaussians": g, "depths": depths}


class EncoderNoPoSplat(_PixelEncoder):  # pose-free, images normalized by the shim
    """Predicts points in the frame of context view 0.

    As a perfect oracle for the geometry (to test PnP), it places view ``j``'s points with the
    *relative* batch pose ``inv(c2w_0) c2w_j``; a real NoPoSplat regresses them.
    """

    def forward(self, context: dict, global_step: int = 0, visualization_dump: Optional[dict] = None) -> Gaussians:
        self.calls.append(dict(global_step=global_step, visualization_dump=visualization_dump))
        lo, hi = float(context["image"].min()), float(context["image"].max())
        self.last_image_range = (lo, hi)
        return self.predict(context)

    def camera_frames(self, context: dict) -> Tensor:
        extr = context["extrinsics"]
        return torch.linalg.inv(extr[:, :1]) @ extr

    def get_data_shim(self):
        mean, std = self.cfg.input_mean, self.cfg.input_std

        def data_shim(batch: dict) -> dict:
            batch = dict(batch)
            ctx = dict(batch["context"])
            ctx["image"] = (ctx["image"] - mean) / std
            batch["context"] = ctx
            return batch
        return data_shim


ENCODERS = {"mvsplat": EncoderCostVolume, "pixelsplat": EncoderEpipolar,
            "depthsplat": EncoderDepthSplat, "noposplat": EncoderNoPoSplat}


def build(name: str, seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    enc = ENCODERS[name](**kw)
    enc.eval()  # BatchNorm with running stats; DepthSplat's b*K batch needs train()
    return enc


def context_for(name: str, **kw: Any) -> dict:
    """Context as the encoder receives it (NoPoSplat: after its normalize shim)."""
    ctx = make_context(**kw)
    if name == "noposplat":
        ctx = build("noposplat").get_data_shim()({"context": ctx})["context"]
    return ctx


def call_args(name: str) -> tuple:
    return (0,) if name != "noposplat" else ()
