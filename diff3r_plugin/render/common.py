"""Shared pieces of the renderers: inputs, checks, output type and the EWA projection.

Every backend follows the upstream CUDA rasterizers (graphdeco's, as modified for pixelSplat,
MVSplat and DepthSplat, and MonoGS's for NoPoSplat):

* FoV-only pinhole projection (:func:`diff3r_plugin.geometry.cameras.get_fov`), pixel ``i``
  centred at coordinate ``i``: ``x = f_x X / Z + (W - 1) / 2``.
* EWA 2D covariance ``J W Sigma W^T J^T`` with the view-space ``x/z, y/z`` clamped to
  ``1.3 tan(fov/2)`` in the Jacobian, plus a 0.3 px^2 dilation.
* Near culling at ``z <= 0.2 near``: upstream rescales the scene by ``1 / near`` and then culls
  ``z <= 0.2``. There is no far culling upstream, and none here (``far`` is accepted for the
  shared interface and for depth normalisation by callers).
* colour ``max(0, SH(d) + 0.5)`` with ``d`` from the camera centre to the mean, degree <= 3,
  in the ``"e3nn"`` or ``"3dgs"`` basis.
* ``alpha = min(0.99, o exp(power))``, pairs with ``alpha < 1/255`` skipped, compositing stops
  before the Gaussian that would bring the transmittance below ``1e-4``, and the background is
  weighted by the final transmittance.

The only deliberate difference: upstream assigns a Gaussian to the 16x16 tiles touched by a
``ceil(3 sigma)`` square, so a pixel just outside that square but with ``alpha >= 1/255`` (a
Gaussian with opacity near 1 reaches 1/255 at 3.33 sigma) is missed there. Here every pixel
with ``alpha >= 1/255`` is composited, which is what the dense reference renderer does too.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import DTypeError, InvalidCovarianceError, NonFiniteError, ShapeError, ValueRangeError
from ..gaussians.layout import check_covariances
from ..geometry.cameras import check_cameras, focal_pixels, get_fov, invert_rigid
from ..geometry.sh import SHBasis, degree_from_coeffs, sh_to_rgb
from . import native

Backend = Literal["torch", "gsplat", "dense"]

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
DILATION = 0.3
NEAR_CULL_FACTOR = 0.2
FOV_CLAMP = 1.3


@dataclass
class RenderOutput:
    """Per-view renders.

    ``color`` includes the background weighted by the final transmittance; ``depth`` is the
    alpha-weighted camera-space z without background (``sum_i w_i z_i``, as upstream's depth
    render); ``alpha`` is the accumulated opacity ``sum_i w_i``.
    """

    color: Float[Tensor, "batch view 3 height width"]
    depth: Float[Tensor, "batch view height width"]
    alpha: Float[Tensor, "batch view height width"]


@dataclass
class Projection:
    """Per (batch, view, Gaussian) screen-space quantities, flattened over (b, v, g)."""

    mean2d: Tensor  # [N, 2] pixel coordinates (pixel i centred at i)
    conic: Tensor  # [N, 3] inverse 2D covariance (a, b, c) of [[a, b], [b, c]]
    cov2d: Tensor  # [N, 3] dilated 2D covariance (a, b, c)
    depth: Tensor  # [N] camera-space z
    color: Tensor  # [N, 3]
    opacity: Tensor  # [N]
    valid: Tensor  # [N] bool, not differentiable
    batch: int
    views: int
    gaussians: int


def check_render_inputs(
    means: Tensor, covariances: Tensor, harmonics: Tensor, opacities: Tensor,
    extrinsics: Tensor, intrinsics: Tensor, near: Tensor, far: Tensor,
    image_shape: tuple[int, int], *, check_values: bool = True,
) -> None:
    """Raise a typed error naming the problem for malformed render inputs."""
    h, w = image_shape
    if int(h) <= 0 or int(w) <= 0:
        raise ShapeError(f"image_shape must be two positive integers, got {tuple(image_shape)}")
    named = {"means": means, "covariances": covariances, "harmonics": harmonics,
             "opacities": opacities, "extrinsics": extrinsics, "intrinsics": intrinsics,
             "near": near, "far": far}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be floating point, got {t.dtype}")
    if means.ndim != 3 or means.shape[-1] != 3:
        raise ShapeError(f"means must be [batch, gaussian, 3], got {tuple(means.shape)}")
    b, g = means.shape[:2]
    if tuple(covariances.shape) != (b, g, 3, 3):
        raise ShapeError(f"covariances must be [{b}, {g}, 3, 3], got {tuple(covariances.shape)}")
    if harmonics.ndim != 4 or tuple(harmonics.shape[:3]) != (b, g, 3):
        raise ShapeError(f"harmonics must be [{b}, {g}, 3, d_sh], got {tuple(harmonics.shape)}")
    degree_from_coeffs(harmonics.shape[-1])
    if tuple(opacities.shape) != (b, g):
        raise ShapeError(f"opacities must be [{b}, {g}], got {tuple(opacities.shape)}")
    if extrinsics.ndim != 4 or extrinsics.shape[0] != b:
        raise ShapeError(f"extrinsics must be [{b}, view, 4, 4], got {tuple(extrinsics.shape)}")
    v = extrinsics.shape[1]
    if tuple(intrinsics.shape) != (b, v, 3, 3):
        raise ShapeError(f"intrinsics must be [{b}, {v}, 3, 3], got {tuple(intrinsics.shape)}")
    for name, t in (("near", near), ("far", far)):
        if tuple(t.shape) != (b, v):
            raise ShapeError(f"{name} must be [{b}, {v}], got {tuple(t.shape)}")
    dtypes = {t.dtype for t in (means, covariances, harmonics, opacities)}
    if len(dtypes) > 1:
        raise DTypeError(f"Gaussian attributes must share one dtype, got {sorted(map(str, dtypes))}")
    if not check_values:
        return
    for name, t in named.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} contains {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    if bool(((opacities < 0) | (opacities > 1)).any()):
        raise ValueRangeError("opacities must lie in [0, 1] (activated, as in the upstream Gaussians)")
    if bool((near <= 0).any()) or bool((far <= near).any()):
        raise ValueRangeError("near must be > 0 and far > near")
    check_cameras(extrinsics, intrinsics, name="render cameras")
    if g:
        bad = check_covariances(covariances)
        if bool(bad.any()):
            idx = torch.nonzero(bad)[0].tolist()
            raise InvalidCovarianceError(
                f"{int(bad.sum())} covariance(s) are not symmetric positive definite (first: "
                f"batch {idx[0]}, gaussian {idx[1]})"
            )


def _broadcast_background(background: Tensor | None, b: int, v: int, like: Tensor) -> Tensor:
    if background is None:
        return like.new_zeros(b, v, 3)
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.shape == (3,):
        return bg.expand(b, v, 3)
    if bg.shape == (b, 3):
        return bg[:, None].expand(b, v, 3)
    if bg.shape == (b, v, 3):
        return bg
    raise ShapeError(f"background_color must be [3], [{b}, 3] or [{b}, {v}, 3], got {tuple(bg.shape)}")


@dataclass
class EWATerms:
    """The intermediates of the EWA projection, per ``[batch, view, gaussian]`` (what
    :func:`project` returns is built from them; its derivative, the layer's
    :mod:`~diff3r_plugin.layer.projection_jacobian`, reads them too)."""

    rot: Tensor  # [b, v, 3, 3] world-to-camera rotation
    x: Tensor  # [b, v, g] camera-space position
    y: Tensor
    z: Tensor
    valid: Tensor  # [b, v, g] bool, in front of the near cull (not differentiable)
    zs: Tensor  # z where valid, else 1 (a constant stand-in)
    u: Tensor  # x / zs
    t: Tensor  # y / zs
    uc: Tensor  # u, t clamped to FOV_CLAMP tan(fov / 2)
    tc: Tensor
    lim_x: Tensor  # [b, v, 1] the clamp limits
    lim_y: Tensor
    fx: Tensor  # [b, v, 1] pixel focal lengths
    fy: Tensor
    m0: Tensor  # [b, v, g, 3] rows of M = J W
    m1: Tensor
    t0: Tensor  # [b, v, g, 3] Sigma m0^T, Sigma m1^T
    t1: Tensor
    a: Tensor  # [b, v, g] dilated 2D covariance [[a, bb], [bb, c]]
    bb: Tensor
    c: Tensor


def ewa_terms(means: Float[Tensor, "batch gaussian 3"], covariances: Float[Tensor, "batch gaussian 3 3"],
              extrinsics: Float[Tensor, "batch view 4 4"], intrinsics: Float[Tensor, "batch view 3 3"],
              near: Float[Tensor, "batch view"], image_shape: tuple[int, int]) -> EWATerms:
    """Camera-space positions, the clamped EWA Jacobian rows and the dilated 2D covariance."""
    w2c = invert_rigid(extrinsics)  # [b, v, 4, 4]
    rot, trans = w2c[..., :3, :3], w2c[..., :3, 3]
    p_cam = torch.einsum("bvij,bgj->bvgi", rot, means) + trans[:, :, None, :]
    x, y, z = p_cam.unbind(-1)
    focal = focal_pixels(intrinsics, image_shape)  # [b, v, 2]
    fx, fy = focal[..., 0:1], focal[..., 1:2]
    tan_half = (0.5 * get_fov(intrinsics)).tan()
    lim_x, lim_y = FOV_CLAMP * tan_half[..., 0:1], FOV_CLAMP * tan_half[..., 1:2]

    valid = (z > NEAR_CULL_FACTOR * near[..., None]).detach()
    z_safe = torch.where(valid, z, torch.ones_like(z))
    u = x / z_safe
    t = y / z_safe

    # EWA Jacobian with the view-space direction clamped as upstream does (keeps Gaussians
    # far outside the frustum from blowing up).
    uc = torch.maximum(torch.minimum(u, lim_x), -lim_x)
    tc = torch.maximum(torch.minimum(t, lim_y), -lim_y)
    # Rows of M = J W with J = [[fx/z, 0, -fx uc/z], [0, fy/z, -fy tc/z]], and the entries
    # m_a Sigma m_b^T of M Sigma M^T, written out: batched 2x3 matrix products are several
    # times slower on CPU than these elementwise products.
    r0, r1, r2 = rot[:, :, None, 0], rot[:, :, None, 1], rot[:, :, None, 2]  # [b, v, 1, 3]
    m0 = (fx / z_safe)[..., None] * r0 + (-fx * uc / z_safe)[..., None] * r2  # [b, v, g, 3]
    m1 = (fy / z_safe)[..., None] * r1 + (-fy * tc / z_safe)[..., None] * r2
    sigma = covariances[:, None]  # [b, 1, g, 3, 3]
    t0 = (sigma * m0[..., None, :]).sum(-1)  # Sigma m0^T
    t1 = (sigma * m1[..., None, :]).sum(-1)
    a = (m0 * t0).sum(-1) + DILATION
    bb = (m0 * t1).sum(-1)
    c = (m1 * t1).sum(-1) + DILATION
    return EWATerms(rot, x, y, z, valid, z_safe, u, t, uc, tc, lim_x, lim_y, fx, fy, m0, m1, t0, t1, a, bb, c)


def view_directions(means: Float[Tensor, "batch gaussian 3"],
                    extrinsics: Float[Tensor, "batch view 4 4"]) -> tuple[Tensor, Tensor]:
    """Unit directions ``[b, v, g, 3]`` from each camera centre to each mean (the SH colour's
    argument), and the distances ``[b, v, g, 1]`` (clamped away from 0)."""
    campos = extrinsics[..., :3, 3]
    rel = means[:, None] - campos[:, :, None]
    dist = rel.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rel / dist, dist


def camera_terms(extrinsics: Float[Tensor, "batch view 4 4"], intrinsics: Float[Tensor, "batch view 3 3"],
                 near: Float[Tensor, "batch view"], image_shape: tuple[int, int]):
    """The per-camera inputs of the compiled projection kernels: world-to-camera ``[b, v, 3, 4]``
    and ``[b, v, 7] = (f_x, f_y, lim_x, lim_y, near_cull, c_x, c_y)``, as :func:`ewa_terms`
    computes them."""
    h, w = image_shape
    w2c = invert_rigid(extrinsics)[..., :3, :]
    focal = focal_pixels(intrinsics, image_shape)
    lim = FOV_CLAMP * (0.5 * get_fov(intrinsics)).tan()
    centre = focal.new_tensor([(w - 1) / 2, (h - 1) / 2]).expand_as(focal)
    cam = torch.cat([focal, lim, (NEAR_CULL_FACTOR * near)[..., None], centre], -1)
    return w2c.contiguous(), cam.contiguous()


def _compiled_projection(mod, means, covariances, extrinsics, intrinsics, near, image_shape) -> Tensor:
    w2c, cam = camera_terms(extrinsics, intrinsics, near, image_shape)
    return mod.pj_project(means.contiguous(), covariances.contiguous(), w2c, cam)


def project(
    means: Float[Tensor, "batch gaussian 3"],
    covariances: Float[Tensor, "batch gaussian 3 3"],
    harmonics: Float[Tensor, "batch gaussian 3 d_sh"],
    opacities: Float[Tensor, "batch gaussian"],
    extrinsics: Float[Tensor, "batch view 4 4"],
    intrinsics: Float[Tensor, "batch view 3 3"],
    near: Float[Tensor, "batch view"],
    image_shape: tuple[int, int],
    sh_basis: SHBasis,
    sh_degree: int | None = None,
) -> Projection:
    """EWA projection of every Gaussian into every view (see module docstring).

    Values only on the CPU (no autograd graph, no forward mode: pair plans, linearizations),
    the geometry comes from one compiled pass per (view, Gaussian)
    (``csrc/projection_jacobian.cpp``, the same formulas as :func:`ewa_terms` below).
    """
    b, g = means.shape[:2]
    v = extrinsics.shape[1]
    h, w = image_shape
    mod = native.usable_values(means, covariances, harmonics, opacities, extrinsics, intrinsics, near)
    if mod is not None:
        packed = _compiled_projection(mod, means, covariances, extrinsics, intrinsics, near, image_shape)
        mean2d, conic, cov2d = packed[..., 0:2], packed[..., 2:5], packed[..., 5:8]
        z, valid = packed[..., 8], packed[..., 9] > 0
    else:
        e = ewa_terms(means, covariances, extrinsics, intrinsics, near, image_shape)
        z = e.z
        mean2d = torch.stack([e.fx * e.u + (w - 1) / 2, e.fy * e.t + (h - 1) / 2], dim=-1)
        a, bb, c = e.a, e.bb, e.c
        det = a * c - bb * bb
        valid = e.valid & (det > 0).detach()
        det_safe = torch.where(valid, det, torch.ones_like(det))
        conic = torch.stack([c / det_safe, -bb / det_safe, a / det_safe], dim=-1)
        cov2d = torch.stack([a, bb, c], -1)

    dirs, _ = view_directions(means, extrinsics)
    color = sh_to_rgb(harmonics[:, None].expand(b, v, g, 3, harmonics.shape[-1]), dirs, sh_basis, sh_degree)
    opacity = opacities[:, None].expand(b, v, g)
    valid = valid & (opacity > ALPHA_MIN).detach()

    n = b * v * g
    return Projection(
        mean2d=mean2d.reshape(n, 2), conic=conic.reshape(n, 3),
        cov2d=cov2d.reshape(n, 3), depth=z.reshape(n),
        color=color.reshape(n, 3), opacity=opacity.reshape(n), valid=valid.reshape(n),
        batch=b, views=v, gaussians=g,
    )
