"""Spherical harmonics: the one SH module.

Two bases are used upstream:

* ``"3dgs"``: the standard 3D Gaussian Splatting basis (graphdeco rasterizer; NoPoSplat's
  diff-gaussian-rasterization-w-pose).
* ``"e3nn"``: pixelSplat/MVSplat/DepthSplat use a rasterizer whose basis was re-mapped to match
  e3nn, i.e. the same polynomials evaluated at ``(x, y, z) = (d_z, d_x, d_y)``.

Colours are ``max(0, SH(d) + 0.5)`` with at most degree 3 evaluated; coefficients beyond
degree 3 (upstream ``sh_degree: 4``) are ignored, exactly as the CUDA rasterizers do.
"""

import math
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ShapeError

SHBasis = Literal["3dgs", "e3nn"]
MAX_RENDER_DEGREE = 3

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
      0.5462742152960396)
C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
      -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def num_coeffs(degree: int) -> int:
    return (degree + 1) ** 2


def degree_from_coeffs(d_sh: int) -> int:
    degree = math.isqrt(d_sh) - 1
    if d_sh < 1 or (degree + 1) ** 2 != d_sh:
        raise ShapeError(f"the number of SH coefficients must be a square (1, 4, 9, 16, 25), got {d_sh}")
    return degree


def rgb_to_sh(rgb: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """DC coefficient ``(rgb - 0.5) / C0`` whose degree-0 colour ``C0 c + 0.5`` is ``rgb``."""
    return (rgb - 0.5) / C0


def sh_basis_values(
    dirs: Float[Tensor, "*batch 3"], degree: int, basis: SHBasis
) -> Float[Tensor, "*batch d"]:
    """Real SH basis functions (as the rasterizers define them) at unit directions."""
    if basis == "e3nn":
        x, y, z = dirs[..., 2], dirs[..., 0], dirs[..., 1]
    elif basis == "3dgs":
        x, y, z = dirs.unbind(-1)
    else:
        raise ValueError(f"unknown SH basis {basis!r}; expected '3dgs' or 'e3nn'")
    out = [torch.full_like(x, C0)]
    if degree > 0:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree > 1:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [C2[0] * xy, C2[1] * yz, C2[2] * (2 * zz - xx - yy), C2[3] * xz, C2[4] * (xx - yy)]
    if degree > 2:
        out += [
            C3[0] * y * (3 * xx - yy),
            C3[1] * xy * z,
            C3[2] * y * (4 * zz - xx - yy),
            C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            C3[4] * x * (4 * zz - xx - yy),
            C3[5] * z * (xx - yy),
            C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def sh_to_rgb(
    harmonics: Float[Tensor, "*batch 3 d_sh"],
    dirs: Float[Tensor, "*batch 3"],
    basis: SHBasis,
    degree: int | None = None,
) -> Float[Tensor, "*batch 3"]:
    """Evaluate view-dependent colour ``max(0, sum_k c_k Y_k(d) + 0.5)``.

    Args:
        harmonics: Coefficients, RGB-major as in the upstream ``Gaussians.harmonics``.
        dirs: Unit viewing directions (camera centre to Gaussian mean).
        basis: ``"3dgs"`` or ``"e3nn"``.
        degree: Highest degree to evaluate (default: all that are present, at most 3).
    """
    d_sh = harmonics.shape[-1]
    available = degree_from_coeffs(d_sh)
    deg = min(available, MAX_RENDER_DEGREE) if degree is None else min(degree, available, MAX_RENDER_DEGREE)
    n = num_coeffs(deg)
    values = sh_basis_values(dirs, deg, basis)  # [..., n]
    rgb = (harmonics[..., :n] * values[..., None, :]).sum(-1)
    return (rgb + 0.5).clamp_min(0.0)
