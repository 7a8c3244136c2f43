"""Dense brute-force reference renderer: every Gaussian against every pixel.

Written for clarity, used only by tests and benchmarks as an independent check of the fast
renderers. It follows the upstream CUDA pipeline literally: the scene is rescaled by
``1 / near`` (``scale_invariant``), points go through the upstream projection matrix
(``get_projection_matrix``) and ``ndc2Pix``, the 2D covariance through the EWA formula, and
each pixel walks all Gaussians front to back with the alpha test, the 0.99 clamp and the
transmittance stop, using a running product for T.
"""

import torch
from torch import Tensor

from ..geometry.cameras import get_fov
from ..geometry.sh import SHBasis, sh_to_rgb
from .common import ALPHA_MAX, ALPHA_MIN, DILATION, FOV_CLAMP, NEAR_CULL_FACTOR, T_MIN, RenderOutput


def _projection_matrix(near: Tensor, far: Tensor, tan_x: Tensor, tan_y: Tensor) -> Tensor:
    """The upstream decoder's projection (x, y to [-1, 1], z to [0, 1], w = z)."""
    p = torch.zeros(4, 4, dtype=near.dtype, device=near.device)
    top, right = tan_y * near, tan_x * near
    p[0, 0] = 2 * near / (2 * right)
    p[1, 1] = 2 * near / (2 * top)
    p[3, 2] = 1
    p[2, 2] = far / (far - near)
    p[2, 3] = -(far * near) / (far - near)
    return p


def render_dense(
    means: Tensor, covariances: Tensor, harmonics: Tensor, opacities: Tensor,
    extrinsics: Tensor, intrinsics: Tensor, near: Tensor, far: Tensor,
    image_shape: tuple[int, int], background: Tensor, sh_basis: SHBasis,
    sh_degree: int | None = None, pixel_chunk: int = 1024,
) -> RenderOutput:
    b, g = means.shape[:2]
    v = extrinsics.shape[1]
    h, w = image_shape
    colors, depths, alphas = [], [], []
    for bi in range(b):
        for vi in range(v):
            c2w = extrinsics[bi, vi]
            s = 1.0 / near[bi, vi]
            # Upstream rescales the scene so that near = 1 before rasterizing.
            c2w_s = torch.cat([torch.cat([c2w[:3, :3], c2w[:3, 3:] * s], 1), c2w[3:]], 0)
            view = torch.linalg.inv(c2w_s)
            mean_s = means[bi] * s
            cov_s = covariances[bi] * s * s
            fov = get_fov(intrinsics[bi, vi])
            tan_x, tan_y = (0.5 * fov[0]).tan(), (0.5 * fov[1]).tan()
            proj = _projection_matrix(near[bi, vi] * s, far[bi, vi] * s, tan_x, tan_y)
            hom = torch.cat([mean_s, torch.ones_like(mean_s[:, :1])], 1)
            p_view = hom @ view.T
            p_hom = p_view @ proj.T
            p_w = 1.0 / (p_hom[:, 3] + 1e-7)
            ndc = p_hom[:, :2] * p_w[:, None]
            pix_x = ((ndc[:, 0] + 1.0) * w - 1.0) * 0.5
            pix_y = ((ndc[:, 1] + 1.0) * h - 1.0) * 0.5
            z = p_view[:, 2]
            # computeCov2D
            focal_x, focal_y = w / (2 * tan_x), h / (2 * tan_y)
            lim_x, lim_y = FOV_CLAMP * tan_x, FOV_CLAMP * tan_y
            tx = torch.clamp(p_view[:, 0] / z, -lim_x, lim_x) * z
            ty = torch.clamp(p_view[:, 1] / z, -lim_y, lim_y) * z
            zeros = torch.zeros_like(z)
            J = torch.stack([
                torch.stack([focal_x / z, zeros, -(focal_x * tx) / (z * z)], -1),
                torch.stack([zeros, focal_y / z, -(focal_y * ty) / (z * z)], -1),
            ], 1)
            T = J @ view[:3, :3]
            cov2 = T @ cov_s @ T.transpose(1, 2)
            a, bb, c = cov2[:, 0, 0] + DILATION, cov2[:, 0, 1], cov2[:, 1, 1] + DILATION
            det = a * c - bb * bb
            visible = (z > NEAR_CULL_FACTOR) & (det != 0)
            det = torch.where(visible, det, torch.ones_like(det))
            con = torch.stack([c / det, -bb / det, a / det], 1)
            dirs = means[bi] - c2w[:3, 3]
            dirs = dirs / dirs.norm(dim=-1, keepdim=True)
            rgb = sh_to_rgb(harmonics[bi], dirs, sh_basis, sh_degree)
            order = torch.argsort(torch.where(visible, z, torch.full_like(z, float("inf"))), stable=True)
            order = order[visible[order]]
            gx, gy, gc, go, grgb, gz = pix_x[order], pix_y[order], con[order], opacities[bi][order], rgb[order], z[order] / s
            ys, xs = torch.meshgrid(torch.arange(h, dtype=means.dtype, device=means.device),
                                    torch.arange(w, dtype=means.dtype, device=means.device), indexing="ij")
            xs, ys = xs.reshape(-1), ys.reshape(-1)
            out_c, out_d, out_a = [], [], []
            for start in range(0, h * w, pixel_chunk):
                px, py = xs[start:start + pixel_chunk, None], ys[start:start + pixel_chunk, None]
                dx, dy = gx[None] - px, gy[None] - py
                power = -0.5 * (gc[None, :, 0] * dx * dx + gc[None, :, 2] * dy * dy) - gc[None, :, 1] * dx * dy
                alpha = torch.clamp(go[None] * torch.exp(power), max=ALPHA_MAX)
                used = (power <= 0) & (alpha >= ALPHA_MIN)
                alpha = torch.where(used, alpha, torch.zeros_like(alpha))
                one_minus = 1 - alpha
                trans = torch.cumprod(torch.cat([torch.ones_like(one_minus[:, :1]), one_minus[:, :-1]], 1), 1)
                include = used & ((trans * one_minus).detach() >= T_MIN)
                wgt = torch.where(include, alpha * trans, torch.zeros_like(alpha))
                acc = wgt.sum(1)
                out_c.append(wgt @ grgb + (1 - acc)[:, None] * background[bi, vi][None])
                out_d.append(wgt @ gz)
                out_a.append(acc)
            colors.append(torch.cat(out_c).T.reshape(3, h, w))
            depths.append(torch.cat(out_d).reshape(h, w))
            alphas.append(torch.cat(out_a).reshape(h, w))
    return RenderOutput(
        color=torch.stack(colors).reshape(b, v, 3, h, w),
        depth=torch.stack(depths).reshape(b, v, h, w),
        alpha=torch.stack(alphas).reshape(b, v, h, w),
    )
