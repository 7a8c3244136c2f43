"""The geometry columns of the projection's Jacobian, in closed form.

For every (view, Gaussian) the explicit Jacobian (:mod:`.sparse_jacobian`) needs the derivative
of the projected features ``f = [mean2d (2), conic (3), opacity, colour (3)]`` with respect to
the Gaussian's mean ``mu``, log-scales ``l`` and quaternion ``q``: ``[N, 9, 10]``. These are the
derivatives of :func:`diff3r_plugin.render.common.project` (EWA splatting), written out so that
they cost a few dozen elementwise passes instead of ten forward-mode passes through the
projection; the forward quantities they need come from the projection's own
:func:`~diff3r_plugin.render.common.ewa_terms` and ``view_directions``. With ``p = R mu + t`` in camera space, ``u = x / z``, ``v = y / z``:

* ``mean2d = (f_x u + c_x, f_y v + c_y)``: ``du/dmu = (R_0 - u R_2) / z``, ``dv/dmu = (R_1 - v R_2) / z``.
* the 2D covariance ``(a, b, c)`` of ``M Sigma M^T + 0.3 I`` with the rows
  ``m_0 = f_x (R_0 - u_c R_2) / z``, ``m_1 = f_y (R_1 - v_c R_2) / z`` (``u_c, v_c`` the clamped
  ``u, v``) and ``Sigma = R_q diag(s^2) R_q^T``::

      da = 2 dm_0 Sigma m_0^T + m_0 dSigma m_0^T,  db = dm_0 Sigma m_1^T + m_0 Sigma dm_1^T + m_0 dSigma m_1^T

  with ``dSigma/dl_k = 2 s_k^2 r_k r_k^T`` and ``dSigma = sum_k s_k^2 (dr_k r_k^T + r_k dr_k^T)``
  for the quaternion (``r_k`` the columns of ``R_q``, whose entries are quadratic in the unit
  quaternion ``q / |q|``);
* the conic ``(c, -b, a) / det``, ``det = a c - b^2``: ``d(x / det) = (dx det - x ddet) / det^2``;
* the colour ``max(0, sum_j sh_j Y_j(d) + 0.5)``, ``d = (mu - o) / |mu - o|``: through the SH
  basis gradient, ``(I - d d^T) / |mu - o|``, where the colour is not clamped.

Culled Gaussians (behind the near plane, degenerate 2D covariance) use the same constant
stand-ins as the projection, so the columns equal its derivative everywhere.

On the CPU, with values only (no autograd graph, no forward mode), the mean, conic and colour
rows come from compiled passes per (view, Gaussian) (``render/csrc/projection_jacobian.cpp``: the
same formulas, the SH basis gradient written out); the PyTorch code below is the path of
everything else and the reference the kernels are tested against.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from ..gaussians.layout import build_covariance
from ..geometry.sh import MAX_RENDER_DEGREE, SHBasis, degree_from_coeffs, sh_basis_values
from ..render import native
from ..render.common import camera_terms, ewa_terms, view_directions

GEOMETRY_SLOTS = 10  # means (3), log-scales (3), quaternion (4)


def _rotation_quadratic(q: Tensor) -> Tensor:
    """``R(q) - I`` for the rotation formula of ``quat_to_rotmat`` (homogeneous quadratic in q)."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([-2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), -2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), -2 * (x * x + y * y)], -1),
    ], dim=-2)


def _rotation_derivatives(quats: Tensor) -> tuple[Tensor, Tensor]:
    """``R_q`` and ``dR_q / dq_i`` ``[..., 4, 3, 3]`` of the normalized-quaternion rotation.

    ``q_hat = q / |q|`` has ``dq_hat / dq = (I - q_hat q_hat^T) / |q|``; ``R - I = Q(q_hat)`` is a
    homogeneous quadratic, so its derivative along ``e`` is ``(Q(q_hat + e) - Q(q_hat - e)) / 2``.
    """
    peak = quats.detach().abs().amax(-1, keepdim=True)
    u = quats / torch.where(peak > 0, peak, torch.ones_like(peak))
    norm_u = u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    qh = u / norm_u
    norm_q = norm_u * torch.where(peak > 0, peak, torch.ones_like(peak))
    eye = torch.eye(4, dtype=quats.dtype, device=quats.device)
    dq = (eye - qh[..., :, None] * qh[..., None, :]) / norm_q[..., None]  # [..., 4 (input i), 4]
    qe = qh[..., None, :]
    d_rot = 0.5 * (_rotation_quadratic(qe + dq) - _rotation_quadratic(qe - dq))  # [..., 4, 3, 3]
    rot = torch.eye(3, dtype=quats.dtype, device=quats.device) + _rotation_quadratic(qh)
    return rot, d_rot


def _sh_direction_gradient(dirs: Tensor, degree: int, basis: SHBasis) -> Tensor:
    """``dY_j / dd`` ``[..., (degree + 1)^2, 3]`` of the SH basis at directions ``d`` (forward mode
    through the small basis polynomial, one pass per axis)."""
    eye = torch.eye(3, dtype=dirs.dtype, device=dirs.device)
    flat = dirs.reshape(-1, 3)

    def along(e):
        return torch.func.jvp(lambda d: sh_basis_values(d, degree, basis), (flat,),
                              (e.expand_as(flat),))[1]

    grads = torch.func.vmap(along)(eye)  # [3, M, n_sh]
    return grads.permute(1, 2, 0).reshape(*dirs.shape[:-1], -1, 3)


def geometry_columns(means: Float[Tensor, "batch gaussian 3"], log_scales: Float[Tensor, "batch gaussian 3"],
                     quats: Float[Tensor, "batch gaussian 4"], harmonics: Float[Tensor, "batch gaussian 3 d_sh"],
                     extrinsics: Float[Tensor, "batch view 4 4"], intrinsics: Float[Tensor, "batch view 3 3"],
                     near: Float[Tensor, "batch view"], image_shape: tuple[int, int], sh_basis: SHBasis,
                     color: Float[Tensor, "row 3"]) -> Float[Tensor, "row 9 10"]:
    """``df / d(mu, l, q)`` for every (view, Gaussian), rows ordered ``(batch, view, gaussian)``.

    ``extrinsics``: the (pose-adjusted) cameras the features were projected with; ``color``:
    the projected colours (their zeros are where the clamp at 0 cuts the derivative).
    """
    b, g = means.shape[:2]
    v = extrinsics.shape[1]
    mod = native.usable_values(means, log_scales, quats, harmonics, extrinsics, intrinsics, near, color)
    if mod is not None:
        cols = _compiled_mean_conic_rows(mod, means, log_scales, quats, extrinsics, intrinsics, near,
                                         image_shape)
        _add_color_rows(cols, means, harmonics, extrinsics, sh_basis, color, mod)
        return cols.reshape(b * v * g, 9, GEOMETRY_SLOTS)
    e = ewa_terms(means, build_covariance(log_scales, quats), extrinsics, intrinsics, near, image_shape)
    dtype = means.dtype
    vf = e.valid.to(dtype)
    zs, u, t = e.zs, e.u, e.t
    free_u = ((u < e.lim_x) & (u > -e.lim_x)).to(dtype)
    free_t = ((t < e.lim_y) & (t > -e.lim_y)).to(dtype)
    fx, fy = e.fx, e.fy

    r0, r1, r2 = e.rot[:, :, None, 0], e.rot[:, :, None, 1], e.rot[:, :, None, 2]  # [b, v, 1, 3]
    dz = vf[..., None] * r2  # dz / dmu (a constant stand-in for culled Gaussians)
    du = (r0 - u[..., None] * dz) / zs[..., None]  # [b, v, g, 3]
    dt = (r1 - t[..., None] * dz) / zs[..., None]
    d_mean2d = torch.stack([fx[..., None] * du, fy[..., None] * dt], -2)  # [b, v, g, 2, 3]

    # Derivatives of the rows m0 = fx e0 / z, m1 = fy e1 / z along each mean coordinate j.
    e0 = r0 - e.uc[..., None] * r2
    e1 = r1 - e.tc[..., None] * r2
    inv_z2 = (1 / (zs * zs))[..., None, None]
    # dm0[..., j, :] = d m0 / d mu_j
    dm0 = fx[..., None, None] * (-inv_z2 * dz[..., :, None] * e0[..., None, :]
                                 - ((free_u[..., None] * du) / zs[..., None])[..., :, None] * r2[..., None, :])
    dm1 = fy[..., None, None] * (-inv_z2 * dz[..., :, None] * e1[..., None, :]
                                 - ((free_t[..., None] * dt) / zs[..., None])[..., :, None] * r2[..., None, :])
    m0, m1, t0, t1 = e.m0, e.m1, e.t0, e.t1
    a, bb, c = e.a, e.bb, e.c

    rq, drq = _rotation_derivatives(quats)  # [b, g, 3, 3], [b, g, 4, 3, 3]
    s2 = (2 * log_scales).exp()  # [b, g, 3]

    # (da, db, dc) along the means [b, v, g, 3 (coord)], ...
    da_mu = 2 * (dm0 * t0[..., None, :]).sum(-1)
    db_mu = (dm0 * t1[..., None, :]).sum(-1) + (dm1 * t0[..., None, :]).sum(-1)
    dc_mu = 2 * (dm1 * t1[..., None, :]).sum(-1)
    # ... along the log-scales: m dSigma m'^T = 2 s_k^2 (m . r_k)(m' . r_k)
    p0 = torch.einsum("bvgi,bgik->bvgk", m0, rq)  # m0 . r_k
    p1 = torch.einsum("bvgi,bgik->bvgk", m1, rq)
    s2v = s2[:, None]
    da_l, db_l, dc_l = 2 * s2v * p0 * p0, 2 * s2v * p0 * p1, 2 * s2v * p1 * p1
    # ... along the quaternion: m dSigma m'^T = sum_k s_k^2 ((m . dr_k)(m' . r_k) + (m . r_k)(m' . dr_k))
    q0 = torch.einsum("bvgi,bgqik->bvgqk", m0, drq)  # m0 . dr_k / dq
    q1 = torch.einsum("bvgi,bgqik->bvgqk", m1, drq)
    s2q = s2v[..., None, :]
    da_q = 2 * (s2q * q0 * p0[..., None, :]).sum(-1)
    db_q = (s2q * (q0 * p1[..., None, :] + p0[..., None, :] * q1)).sum(-1)
    dc_q = 2 * (s2q * q1 * p1[..., None, :]).sum(-1)
    d_abc = torch.stack([torch.cat([da_mu, da_l, da_q], -1), torch.cat([db_mu, db_l, db_q], -1),
                         torch.cat([dc_mu, dc_l, dc_q], -1)], -2)  # [b, v, g, 3, 10]

    det = a * c - bb * bb
    ok = (e.valid & (det > 0).detach())
    dets = torch.where(ok, det, torch.ones_like(det))
    da, db, dc = d_abc.unbind(-2)
    ddet = ok.to(dtype)[..., None] * (da * c[..., None] + a[..., None] * dc - 2 * bb[..., None] * db)
    inv2 = (1 / (dets * dets))[..., None]
    d_conic = torch.stack([(dc * dets[..., None] - c[..., None] * ddet) * inv2,
                           -(db * dets[..., None] - bb[..., None] * ddet) * inv2,
                           (da * dets[..., None] - a[..., None] * ddet) * inv2], -2)  # [b, v, g, 3, 10]

    n = b * v * g
    cols = means.new_zeros(b, v, g, 9, GEOMETRY_SLOTS)
    cols[..., 0:2, 0:3] = d_mean2d
    cols[..., 2:5, :] = d_conic
    _add_color_rows(cols, means, harmonics, extrinsics, sh_basis, color)
    return cols.reshape(n, 9, GEOMETRY_SLOTS)


def _compiled_mean_conic_rows(mod, means, log_scales, quats, extrinsics, intrinsics, near,
                              image_shape) -> Tensor:
    """The mean2d and conic rows ``[b, v, g, 9, 10]`` (other rows zero) from the compiled pass."""
    w2c, cam = camera_terms(extrinsics, intrinsics, near, image_shape)
    return mod.pj_geometry_columns(means.contiguous(), log_scales.contiguous(), quats.contiguous(), w2c, cam)


def _add_color_rows(cols: Tensor, means: Tensor, harmonics: Tensor, extrinsics: Tensor,
                    sh_basis: SHBasis, color: Tensor, mod=None) -> None:
    """Colour along the means (view-dependent SH only), written into ``cols[..., 6:9, 0:3]``;
    ``mod``: the compiled kernels (values only), whose ``pj_color_rows`` is the same formula with
    the basis gradient written out instead of three forward-mode passes."""
    b, v, g = cols.shape[:3]
    dtype = cols.dtype
    d_sh = harmonics.shape[-1]
    degree = min(degree_from_coeffs(d_sh), MAX_RENDER_DEGREE)
    if degree > 0 and mod is not None:
        if sh_basis not in ("3dgs", "e3nn"):
            raise ValueError(f"unknown SH basis {sh_basis!r}; expected '3dgs' or 'e3nn'")
        campos = extrinsics[..., :3, 3].contiguous()
        cols[..., 6:9, 0:3] = mod.pj_color_rows(means.contiguous(), harmonics.contiguous(), campos,
                                                color.reshape(b, v, g, 3).contiguous(), degree,
                                                sh_basis == "e3nn")
    elif degree > 0:
        k = (degree + 1) ** 2
        dirs, dist = view_directions(means, extrinsics)  # [b, v, g, 3], [b, v, g, 1]
        grad_y = _sh_direction_gradient(dirs, degree, sh_basis)  # [b, v, g, k, 3]
        gd = torch.einsum("bgcj,bvgjd->bvgcd", harmonics[..., :k], grad_y)  # [b, v, g, 3 (rgb), 3]
        proj = gd - (gd * dirs[..., None, :]).sum(-1, keepdim=True) * dirs[..., None, :]
        lit = (color.reshape(b, v, g, 3) > 0).detach().to(dtype)
        cols[..., 6:9, 0:3] = lit[..., None] * proj / dist[..., None]
