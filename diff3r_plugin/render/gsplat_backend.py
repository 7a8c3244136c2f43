"""gsplat backend (CUDA only): the same interface through ``gsplat.rasterization``.

Colours are evaluated by our SH module per view and passed as ``[C, N, 3]`` colours, so both
SH bases are supported (gsplat itself only knows the standard basis). Pixel centres: gsplat
compares ``f X / Z + c_x`` with ``i + 0.5``; with ``c_x = W / 2`` this is the upstream
``f X / Z + (W - 1) / 2`` against ``i``. Near culling at ``0.2 near``, no far culling, 0.3 px^2
dilation (``eps2d``), like the upstream rasterizers. gsplat has only a first-order backward,
so the layer uses finite-difference JVPs with it.

Known difference: gsplat (1.5) caps alpha at 0.999 where the upstream rasterizers cap at 0.99,
so Gaussians whose ``o exp(power)`` exceeds 0.99 render slightly more opaque here than upstream.
"""

import torch
from torch import Tensor

from ..errors import BackendUnavailableError
from ..geometry.cameras import focal_pixels, invert_rigid
from ..geometry.sh import SHBasis, sh_to_rgb
from .common import DILATION, NEAR_CULL_FACTOR, RenderOutput


def gsplat_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "the gsplat backend needs a CUDA device"
    try:
        import gsplat  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, f"gsplat cannot be imported: {exc}"
    return True, ""


def render_gsplat(
    means: Tensor, covariances: Tensor, harmonics: Tensor, opacities: Tensor,
    extrinsics: Tensor, intrinsics: Tensor, near: Tensor, far: Tensor,
    image_shape: tuple[int, int], background: Tensor, sh_basis: SHBasis,
    sh_degree: int | None = None,
) -> RenderOutput:
    ok, why = gsplat_available()
    if not ok:
        raise BackendUnavailableError(why)
    if not means.is_cuda:
        raise BackendUnavailableError("the gsplat backend needs CUDA tensors; move the inputs with .cuda()")
    from gsplat import rasterization

    b, g = means.shape[:2]
    v = extrinsics.shape[1]
    h, w = image_shape
    focal = focal_pixels(intrinsics, image_shape)
    colors, depths, alphas = [], [], []
    for bi in range(b):
        ks = torch.zeros(v, 3, 3, dtype=means.dtype, device=means.device)
        ks[:, 0, 0] = focal[bi, :, 0]
        ks[:, 1, 1] = focal[bi, :, 1]
        ks[:, 0, 2] = w / 2
        ks[:, 1, 2] = h / 2
        ks[:, 2, 2] = 1
        viewmats = invert_rigid(extrinsics[bi])
        dirs = means[bi][None] - extrinsics[bi, :, None, :3, 3]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        rgb = sh_to_rgb(harmonics[bi][None].expand(v, g, 3, harmonics.shape[-1]), dirs, sh_basis, sh_degree)
        # Near culling must match per view; gsplat takes one near plane, so render per view.
        for vi in range(v):
            out, alpha, _ = rasterization(
                means=means[bi], quats=None, scales=None, covars=covariances[bi],
                opacities=opacities[bi], colors=rgb[vi:vi + 1], viewmats=viewmats[vi:vi + 1],
                Ks=ks[vi:vi + 1], width=w, height=h,
                near_plane=float(NEAR_CULL_FACTOR * near[bi, vi]), far_plane=1e10,
                eps2d=DILATION, render_mode="RGB+ED", packed=False,
                backgrounds=None, rasterize_mode="classic",
            )
            a = alpha[0, ..., 0]
            rgb_img = out[0, ..., :3] + (1 - a)[..., None] * background[bi, vi]
            colors.append(rgb_img.permute(2, 0, 1))
            # gsplat's ED mode normalizes depth by alpha; undo to match sum_i w_i z_i.
            depths.append(out[0, ..., 3] * a)
            alphas.append(a)
    return RenderOutput(
        color=torch.stack(colors).reshape(b, v, 3, h, w),
        depth=torch.stack(depths).reshape(b, v, h, w),
        alpha=torch.stack(alphas).reshape(b, v, h, w),
    )
