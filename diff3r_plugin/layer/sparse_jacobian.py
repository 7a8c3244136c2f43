"""The Jacobian of the torch renderer's residuals, held explicitly in factored sparse form.

With the pair list frozen at ``theta``, pixel ``p``'s colour depends on Gaussian ``i`` only
through ``i``'s projected features in that view, ``f = [mean2d (2), conic (3), opacity, colour
(3)]``, and every Gaussian's features depend only on its own parameters and its view's camera
(and pose delta). So the Jacobian factors exactly into

    J[(p, c), theta_i] = L[pair (p, i)] (3 x 9)  @  F[(view, i)] (9 x n_i)

* ``F``: per (view, Gaussian) Jacobian of the projection: the geometry columns (means,
  log-scales, quaternion) in closed form (:mod:`.projection_jacobian`), the opacity and SH
  columns in closed form too and kept factored for the products (:class:`Appearance`), the
  pose columns from one forward-mode JVP per pose slot (one slot of every view at once),
  batched through ``torch.func.vmap``.
* ``L``: per pair, in closed form from the compositing rule
  ``C = bg + sum_i w_i (c_i - bg)`` with ``w_i = k_i alpha_i T_i``:

      dC/dalpha_i = k_i T_i (c_i - bg) - S_i / (1 - alpha_i),   S_i = sum_{j behind i} w_j (c_j - bg)
      dC/dc_i = w_i I

  and ``dalpha_i / d(mean2d, conic, opacity)`` of ``alpha = min(0.99, o exp(power))``.

Products ``J p`` and ``J^T u`` are then gathers and scatter-adds over pairs (no pass through
the renderer), and ``diag(J^T W J)`` and the per-Gaussian blocks of ``J^T W J`` are exact.
On the CPU the passes over the pairs run as compiled kernels (``render/csrc/pair_jacobian.cpp``:
the factors, ``J p``, ``J^T u``, a fused ``J^T W J p``, the moments of the blocks). The PyTorch
path computes the same from differentiable operations; it runs wherever a value must stay on an
autograd graph (``theta`` on a graph: the products stay differentiable with respect to the
linearization point), in forward mode and off the CPU.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..gaussians.layout import GaussianLayout, GaussianParams
from ..render import native
from ..render.api import pose_adjusted_extrinsics
from ..render.common import ALPHA_MAX, _broadcast_background, project, view_directions
from ..render.torch_backend import PairPlan, _pair_power, build_plan, pair_transmittance
from .projection_jacobian import GEOMETRY_SLOTS, geometry_columns
from .views import ContextViews

NUM_FEATURES = 9  # mean2d (2), conic (3), opacity (1), colour (3)


def _compiled(*tensors: Tensor):
    """The compiled pair kernels (:mod:`..render.native`) when these tensors may use them.

    Only for values: where a product must stay on an autograd graph (the unrolled LM's
    differentiable linearization), in forward mode or off the CPU, the PyTorch path runs.
    """
    return native.usable_values(*tensors)


def _index(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.long().contiguous()


def gaussian_slots(layout: GaussianLayout, device=None) -> Tensor:
    """``[G, n_i]`` flat indices of each Gaussian's own parameters (all groups but pose)."""
    g = layout.num_gaussians
    cols = []
    for group, s in layout.slices.items():
        if group == "pose":
            continue
        per = layout.group_numel(group) // max(g, 1)
        if per == 0:
            continue
        base = s.start + torch.arange(g, device=device)[:, None] * per
        cols.append(base + torch.arange(per, device=device)[None])
    return torch.cat(cols, 1) if cols else torch.zeros(g, 0, dtype=torch.long, device=device)


def _features(theta: Tensor, layout: GaussianLayout, views: ContextViews, *, with_projection: bool = False):
    """``[N, 9]`` projected features of ``theta``, with its parameters and the pose-adjusted
    cameras they were projected with (and the projection itself, ``with_projection=True``)."""
    params = GaussianParams.unflatten(theta, layout)
    extr = pose_adjusted_extrinsics(params, views.extrinsics)
    proj = project(params.means, params.covariances(), params.harmonics, params.opacities(), extr,
                   views.intrinsics, views.near, views.image_shape, views.sh_basis)
    feats = torch.cat([proj.mean2d, proj.conic, proj.opacity[:, None], proj.color], 1)
    return (feats, params, extr, proj) if with_projection else (feats, params, extr)


@dataclass
class Appearance:
    """The appearance columns of ``F`` in factored form (see :func:`_appearance`)."""

    opacity: Tensor  # [N] do/dl
    color: Tensor  # [N, 3, d_sh] dc_k/dsh_kj = Y_j(d) [c_k > 0], j over the DC and the higher coefficients

    def columns(self) -> Tensor:
        """The dense columns ``[N, 9, 1 + 3 d_sh]`` in slot order (opacity, DC x 3, rest by channel)."""
        n, _, d_sh = self.color.shape
        cols = self.color.new_zeros(n, NUM_FEATURES, 1 + 3 + 3 * (d_sh - 1))
        cols[:, 5, 0] = self.opacity
        for c in range(3):
            cols[:, 6 + c, 1 + c] = self.color[:, c, 0]
            lo = 4 + c * (d_sh - 1)
            cols[:, 6 + c, lo:lo + d_sh - 1] = self.color[:, c, 1:]
        return cols

    def tangent(self, pa: Tensor) -> Tensor:
        """Feature tangents ``[N, 9]`` of the appearance slots ``pa`` ``[N, 1 + 3 d_sh]``."""
        n, _, d_sh = self.color.shape
        sh = torch.cat([pa[:, 1:4, None], pa[:, 4:].reshape(n, 3, d_sh - 1)], 2)
        q = pa.new_zeros(n, NUM_FEATURES)
        return torch.cat([q[:, :5], (self.opacity * pa[:, 0])[:, None], (self.color * sh).sum(2)], 1)

    def cotangent(self, ct: Tensor) -> Tensor:
        """``F_app^T ct`` per row: ``[N, 1 + 3 d_sh]`` in slot order."""
        n, _, d_sh = self.color.shape
        sh = self.color * ct[:, 6:9, None]
        return torch.cat([(self.opacity * ct[:, 5])[:, None], sh[:, :, 0], sh[:, :, 1:].reshape(n, -1)], 1)


def _appearance(params: GaussianParams, extrinsics: Tensor, views: ContextViews, feats: Tensor) -> Appearance:
    """The columns of ``F`` for the opacity logit and the SH coefficients.

    With ``o = sigmoid(l)`` and colour ``c_k = max(0, sum_j sh_kj Y_j(d) + 0.5)`` per channel
    (``d`` the unit direction from the camera centre; coefficients above the rendered degree
    have ``Y = 0``)::

        do / dl = o (1 - o),    dc_k / dsh_kj = Y_j(d) [c_k > 0]

    Each is one feature of one Gaussian, so forward mode (one pass per slot through the
    projection) is replaced by these products (for degree-3 SH, 49 passes fewer), and the
    products with ``F`` use them in this factored form.
    """
    from ..geometry.sh import C0, MAX_RENDER_DEGREE, degree_from_coeffs, sh_basis_values

    b, g = params.means.shape[:2]
    v = views.num_views
    n = b * v * g
    o = params.opacities()
    d_sh = params.sh_rest.shape[-1] + 1
    lit = (feats[:, 6:9] > 0).detach().to(feats.dtype)  # where the colour is not clamped at 0
    degree = min(degree_from_coeffs(d_sh), MAX_RENDER_DEGREE)
    if degree > 0:
        dirs, _ = view_directions(params.means, extrinsics)
        basis = sh_basis_values(dirs, degree, views.sh_basis).reshape(n, -1)  # [N, (degree + 1)^2]
    else:
        basis = feats.new_full((n, 1), C0)
    if basis.shape[1] < d_sh:
        basis = torch.cat([basis, basis.new_zeros(n, d_sh - basis.shape[1])], 1)
    return Appearance((o * (1 - o))[:, None].expand(b, v, g).reshape(n), lit[:, :, None] * basis[:, None, :])


def _pair_factors_torch(feats: Tensor, bg: Tensor, plan: PairPlan, pixels_per_view: int, dtype):
    """``g_alpha [P, 3], d_alpha [P, 6], weight [P]`` of every pair and the composited colour
    ``[num_pixels, 3]`` (differentiable; the compiled ``pj_build`` does the same in one pass)."""
    pg = feats.index_select(0, plan.gaussian)
    dx = pg[:, 0] - plan.px
    dy = pg[:, 1] - plan.py
    ca, cb, cc = pg[:, 2], pg[:, 3], pg[:, 4]
    gauss = torch.exp(_pair_power(pg[:, 0], pg[:, 1], ca, cb, cc, plan.px, plan.py))
    raw = pg[:, 5] * gauss
    alpha = torch.clamp_max(raw, ALPHA_MAX)
    free = (raw <= ALPHA_MAX).to(dtype)
    trans, keep = pair_transmittance(alpha, plan.seg_start)
    weight = alpha * trans * keep
    pix_view = torch.div(plan.pixel, pixels_per_view, rounding_mode="floor")
    cd = pg[:, 6:9] - bg.index_select(0, pix_view)
    wc = (weight[:, None] * cd).double()
    total = torch.zeros(plan.num_pixels, 3, dtype=wc.dtype, device=feats.device).index_add(0, plan.pixel, wc)
    inc = torch.cumsum(wc, 0)
    start = inc.index_select(0, plan.seg_start) - wc.index_select(0, plan.seg_start)
    behind = (total.index_select(0, plan.pixel) - (inc - start)).to(dtype)
    g_alpha = (keep * trans)[:, None] * cd - behind / (1 - alpha)[:, None]
    da = (free * alpha)[:, None] * torch.stack(
        [-(ca * dx + cb * dy), -(cc * dy + cb * dx), -0.5 * dx * dx, -dx * dy, -0.5 * dy * dy], 1)
    d_alpha = torch.cat([da, (free * gauss)[:, None]], 1)
    # The composite of the pairs: the render at theta, whose residual the products linearize.
    color = bg.index_select(0, torch.div(torch.arange(plan.num_pixels, device=feats.device), pixels_per_view,
                                          rounding_mode="floor"))
    color = color.index_add(0, plan.pixel, weight[:, None] * cd)
    return g_alpha, d_alpha, weight, color


@dataclass
class SparseJacobian:
    """``J`` of the flat residuals ``[b, m]`` (``m = v * 3 * h * w``) at one ``theta``."""

    layout: GaussianLayout
    views: ContextViews
    plan: PairPlan
    slots: Tensor  # [G, n_i]
    geo_jac: Tensor  # [N, 9, n_geo], N = b * v * G: the geometry columns of F (dense)
    pose_jac: Tensor | None  # [N, 9, 6] or None
    g_alpha: Tensor  # [P, 3] dC/dalpha per pair
    d_alpha: Tensor  # [P, 6] dalpha/d(mean2d, conic, opacity) per pair
    weight: Tensor  # [P] w_i = k_i alpha_i T_i
    sqrt_w: Tensor | None  # [num_pixels, 3] or None
    residual: Tensor  # [b, m] weighted residual at theta
    appearance: Appearance | None = None  # the other columns, factored (products use these)
    _moments: Tensor | None = None  # feature_moments, once computed (chunking only bounds memory)
    _wsq: Tensor | None = None  # sqrt_w^2, contiguous, once computed (every fused product reads it)
    _app_contig: tuple[Tensor, Tensor] | None = None  # the appearance factors, contiguous, for the kernels
    _feat_jac: Tensor | None = None  # the dense F, once asked for

    @property
    def feat_jac(self) -> Tensor:
        """The dense ``F = [geometry | appearance]`` ``[N, 9, n_i]``, formed on first use: the
        compiled kernels read the factored columns instead, only the PyTorch paths need it."""
        if self._feat_jac is None:
            self._feat_jac = (torch.cat([self.geo_jac, self.appearance.columns()], 2)
                              if self.appearance is not None else self.geo_jac)
        return self._feat_jac

    # -- construction ------------------------------------------------------------------

    @classmethod
    def build(cls, theta: Tensor, layout: GaussianLayout, views: ContextViews, plan: PairPlan | None,
              sqrt_w: Tensor | None = None) -> "SparseJacobian":
        """The Jacobian at ``theta`` over the pair list ``plan``; ``plan=None``: the pair list of
        ``theta`` itself, built from the same projection as the features (one projection
        instead of two)."""
        b = theta.shape[0]
        v = views.num_views
        h, w = views.image_shape
        device, dtype = theta.device, theta.dtype
        slots = gaussian_slots(layout, device)
        feats, params, extr, proj = _features(theta, layout, views, with_projection=True)
        if plan is None:
            plan = build_plan(proj, views.image_shape)

        # F: the geometry and appearance columns in closed form (.projection_jacobian,
        # _appearance); the pose columns by one JVP of the projection per pose slot (a slot of
        # every view at once), the slots batched through one vmap.
        def feat_fn(t):
            return _features(t, layout, views)[0]

        def columns(index_sets) -> Tensor:
            tangents = theta.new_zeros(len(index_sets), *theta.shape)
            for k, index in enumerate(index_sets):
                tangents[k][:, index] = 1
            out = torch.func.vmap(lambda tan: torch.func.jvp(feat_fn, (theta,), (tan,))[1])(tangents)
            return out.movedim(0, -1)

        n_i = slots.shape[1]
        if n_i == 0:  # no Gaussians: no columns
            geo = feats.new_zeros(feats.shape[0], NUM_FEATURES, 0)
        else:
            geo = geometry_columns(params.means, params.log_scales, params.quats, params.harmonics, extr,
                                   views.intrinsics, views.near, views.image_shape, views.sh_basis,
                                   feats[:, 6:9])
        app = _appearance(params, extr, views, feats) if n_i > GEOMETRY_SLOTS else None
        pose_jac = None
        p_views = layout.num_pose_views
        if p_views > 0:
            ps = layout.slices["pose"]
            pose_jac = columns([torch.arange(ps.start + k, ps.stop, 6, device=device) for k in range(6)])

        # L: closed-form derivatives of the compositing of every pair.
        bg = _broadcast_background(views.background, b, v, theta).reshape(b * v, 3)
        mod = _compiled(feats, bg)
        if mod is not None:
            g_alpha, d_alpha, weight, color = mod.pj_build(
                feats.contiguous(), _index(plan.gaussian), _index(plan.pixel), plan.px.contiguous(),
                plan.py.contiguous(), bg.contiguous(), h * w, plan.num_pixels)
        else:
            g_alpha, d_alpha, weight, color = _pair_factors_torch(feats, bg, plan, h * w, dtype)
        sw = None
        if sqrt_w is not None:
            sw = sqrt_w.expand(b, v, 3, h, w).permute(0, 1, 3, 4, 2).reshape(-1, 3)
        images = views.images.permute(0, 1, 3, 4, 2).reshape(-1, 3)
        res = color - images
        if sw is not None:
            res = res * sw
        residual = res.reshape(b, v, h, w, 3).permute(0, 1, 4, 2, 3).reshape(b, -1)
        return cls(layout, views, plan, slots, geo.contiguous(), pose_jac, g_alpha, d_alpha, weight, sw, residual,
                   app)

    # -- products ----------------------------------------------------------------------

    @property
    def _shape(self):
        b = self.residual.shape[0]
        h, w = self.views.image_shape
        return b, self.views.num_views, h, w

    @property
    def _pixels_per_view(self) -> int:
        h, w = self.views.image_shape
        return h * w

    def _to_pixels(self, u: Tensor) -> Tensor:
        b, v, h, w = self._shape
        return u.reshape(b, v, 3, h, w).permute(0, 1, 3, 4, 2).reshape(-1, 3)

    def _from_pixels(self, img: Tensor) -> Tensor:
        b, v, h, w = self._shape
        return img.reshape(b, v, h, w, 3).permute(0, 1, 4, 2, 3).reshape(b, -1)

    def feature_tangent(self, p: Tensor) -> Tensor:
        """``F p``: ``[N, 9]`` tangents of the projected features."""
        b, v = self._shape[:2]
        g = self.layout.num_gaussians
        mod = self._compiled_f(p)
        if mod is not None:
            q = mod.pj_tangent(self.geo_jac.contiguous(), *self._kernel_appearance(), p.contiguous(),
                               self._slots_index, v)
            return q + self._pose_tangent(p) if self.pose_jac is not None else q
        pg = p[:, self.slots]  # [b, G, n_i]
        pg = pg[:, None].expand(b, v, g, pg.shape[-1]).reshape(b * v * g, -1)
        if self.appearance is None:
            q = torch.einsum("nfs,ns->nf", self.feat_jac, pg)
        else:
            n_geo = self.geo_jac.shape[2]
            q = torch.einsum("nfs,ns->nf", self.geo_jac, pg[:, :n_geo]) + self.appearance.tangent(pg[:, n_geo:])
        if self.pose_jac is not None:
            q = q + self._pose_tangent(p)
        return q

    def _pose_tangent(self, p: Tensor) -> Tensor:
        """The pose columns' share of ``F p``: ``[N, 9]`` (view 0 is the reference, fixed)."""
        b, v = self._shape[:2]
        g = self.layout.num_gaussians
        pp = torch.zeros(b, v, 6, dtype=p.dtype, device=p.device)
        npv = self.layout.num_pose_views
        pp = torch.cat([pp[:, :1], p[:, self.layout.slices["pose"]].reshape(b, npv, 6), pp[:, npv + 1:]], 1)
        pp = pp[:, :, None].expand(b, v, g, 6).reshape(b * v * g, 6)
        return torch.einsum("nfs,ns->nf", self.pose_jac, pp)

    def _compiled_f(self, x: Tensor):
        """The compiled products with ``F`` for the value ``x`` (see :func:`_compiled`)."""
        if self.layout.num_gaussians == 0 or self.slots.shape[1] == 0:
            return None
        return _compiled(x, self.geo_jac, *self._appearance_factors())

    def _appearance_factors(self) -> tuple[Tensor, ...]:
        """``(opacity [N], color [N, 3, d_sh])`` of the factored appearance columns, or ``()``."""
        if self.appearance is None:
            return ()
        if self._app_contig is None:
            self._app_contig = (self.appearance.opacity.contiguous(), self.appearance.color.contiguous())
        return self._app_contig

    def _kernel_appearance(self) -> tuple[Tensor | None, Tensor | None]:
        """The kernels' two optional appearance arguments (``None`` without appearance slots)."""
        factors = self._appearance_factors()
        return factors if factors else (None, None)

    @property
    def _slots_index(self) -> Tensor:
        return _index(self.slots)

    def _pair_tensors(self) -> tuple[Tensor, ...]:
        return self.g_alpha.contiguous(), self.d_alpha.contiguous(), self.weight.contiguous()

    def jvp(self, p: Tensor) -> Tensor:
        """``W^1/2 J p`` as ``[b, m]``."""
        q = self.feature_tangent(p)
        mod = _compiled(q, *self._pair_tensors())
        if mod is not None:
            img = mod.pj_jvp(q.contiguous(), _index(self.plan.gaussian), _index(self.plan.pixel),
                             *self._pair_tensors(), self.plan.num_pixels)
        else:
            q = q.index_select(0, self.plan.gaussian)
            val = self.g_alpha * (self.d_alpha * q[:, :6]).sum(1, keepdim=True) + self.weight[:, None] * q[:, 6:]
            img = torch.zeros(self.plan.num_pixels, 3, dtype=p.dtype, device=p.device).index_add(
                0, self.plan.pixel, val)
        if self.sqrt_w is not None:
            img = img * self.sqrt_w
        return self._from_pixels(img)

    def vjp(self, u: Tensor) -> Tensor:
        """``J^T W^1/2 u`` as ``[b, n]``."""
        b, v = self._shape[:2]
        g = self.layout.num_gaussians
        up = self._to_pixels(u)
        if self.sqrt_w is not None:
            up = up * self.sqrt_w
        mod = _compiled(up, *self._pair_tensors())
        if mod is not None:
            ct = mod.pj_vjp(up.contiguous(), _index(self.plan.gaussian), _index(self.plan.pixel),
                            *self._pair_tensors(), b * v * g, self._pixels_per_view)
        else:
            up = up.index_select(0, self.plan.pixel)
            s = (self.g_alpha * up).sum(1, keepdim=True)
            ct_pair = torch.cat([self.d_alpha * s, self.weight[:, None] * up], 1)
            ct = torch.zeros(b * v * g, NUM_FEATURES, dtype=u.dtype, device=u.device).index_add(
                0, self.plan.gaussian, ct_pair)
        return self.parameter_cotangent(ct)

    def parameter_cotangent(self, ct: Tensor) -> Tensor:
        """``F^T ct`` summed over views: the ``[b, n]`` cotangent of the parameters from the
        ``[N, 9]`` cotangents of the projected features."""
        b, v = self._shape[:2]
        g = self.layout.num_gaussians
        start = self.layout.slices["pose"].start
        mod = self._compiled_f(ct)
        if mod is not None:
            out = mod.pj_cotangent(self.geo_jac.contiguous(), *self._kernel_appearance(), ct.contiguous(),
                                   self._slots_index, b, v, start)
            return self._with_pose_cotangent(out, ct)
        if self.appearance is None:
            per_row = torch.einsum("nfs,nf->ns", self.feat_jac, ct)
        else:
            per_row = torch.cat([torch.einsum("nfs,nf->ns", self.geo_jac, ct), self.appearance.cotangent(ct)], 1)
        per_slot = per_row.reshape(b, v, g, -1).sum(1)
        out = torch.zeros(b, start, dtype=ct.dtype, device=ct.device)
        out = out.index_copy(1, self.slots.reshape(-1), per_slot.reshape(b, -1))
        return self._with_pose_cotangent(out, ct)

    def _with_pose_cotangent(self, out: Tensor, ct: Tensor) -> Tensor:
        """``out`` (the Gaussians' cotangents) followed by the pose slots' ``F^T ct``."""
        if self.pose_jac is None:
            return out
        b, v = self._shape[:2]
        g = self.layout.num_gaussians
        npv = self.layout.num_pose_views
        pose = torch.einsum("nfs,nf->ns", self.pose_jac, ct).reshape(b, v, g, 6).sum(2)
        return torch.cat([out, pose[:, 1:npv + 1].reshape(b, -1)], 1)

    def gauss_newton(self, p: Tensor) -> Tensor:
        """``J^T W J p`` (the compiled path fuses the two passes over the pairs)."""
        q = self.feature_tangent(p)
        mod = _compiled(q, *self._pair_tensors())
        if mod is None:
            return self.vjp(self.jvp(p))
        if self.sqrt_w is not None and self._wsq is None:
            self._wsq = (self.sqrt_w * self.sqrt_w).contiguous()
        wsq = self._wsq
        b, v = self._shape[:2]
        ct = mod.pj_gauss_newton(q.contiguous(), _index(self.plan.gaussian), _index(self.plan.pixel),
                                 *self._pair_tensors(), wsq, b * v * self.layout.num_gaussians,
                                 self._pixels_per_view)
        return self.parameter_cotangent(ct)

    # -- exact diagonal and per-Gaussian blocks -----------------------------------------

    def _pair_factors(self, lo: int, hi: int) -> Tensor:
        """``A`` of pairs ``lo:hi``, ``[pairs, 3, 9]``: a pair's rows of ``W^1/2 J`` are
        ``A[pair] @ F[(view, Gaussian)]``, with ``A = W^1/2 [dC/dalpha dalpha/df | w I]``."""
        loc = self.g_alpha[lo:hi, :, None] * self.d_alpha[lo:hi, None, :]  # [k, 3, 6]
        eye = torch.eye(3, dtype=loc.dtype, device=loc.device)
        a = torch.cat([loc, self.weight[lo:hi, None, None] * eye], 2)
        if self.sqrt_w is not None:
            a = a * self.sqrt_w.index_select(0, self.plan.pixel[lo:hi])[:, :, None]
        return a

    def _pair_blocks(self, lo: int, hi: int, feat_jac: Tensor | None = None) -> Tensor:
        """``W^1/2 J`` restricted to pairs ``lo:hi``: ``[pairs, 3, n_i]`` (or, with
        ``feat_jac=self.pose_jac``, the pairs' parts of the pose columns ``[pairs, 3, 6]``)."""
        feat_jac = self.feat_jac if feat_jac is None else feat_jac
        f = feat_jac.index_select(0, self.plan.gaussian[lo:hi])  # [k, 9, n_i]
        return torch.einsum("kcf,kfs->kcs", self._pair_factors(lo, hi), f)

    def feature_moments(self, chunk: int = 1 << 17) -> Tensor:
        """``M[(view, Gaussian)] = sum over its pairs of A^T A``: ``[N, 9, 9]``.

        The Gaussian blocks of ``J^T W J`` are ``sum over views of F^T M F``, so the pairs are
        reduced to 9 x 9 feature moments before the (larger) parameter blocks are formed.

        ``A = diag(s) [g d^T | w I]`` (``g = dC/dalpha``, ``d = dalpha/df``, ``s = W^1/2``) has
        rank-one structure, so with ``G = s * g``::

            A^T A = [[|G|^2 d d^T, d (w s * G)^T], [(w s * G) d^T, diag((w s)^2)]]

        which is formed from per-pair vectors by broadcasting (many tiny 9 x 3 matrix
        products are several times slower on a CPU).
        """
        if self._moments is None:
            self._moments = self._feature_moments(chunk)
        return self._moments

    def _feature_moments(self, chunk: int) -> Tensor:
        n = self.geo_jac.shape[0]
        extra = () if self.sqrt_w is None else (self.sqrt_w,)
        mod = _compiled(*self._pair_tensors(), *extra)
        if mod is not None:
            # [N, 9, 9], assembled in the kernel.
            return mod.pj_moments(_index(self.plan.gaussian), _index(self.plan.pixel), *self._pair_tensors(),
                                  None if self.sqrt_w is None else self.sqrt_w.contiguous(), n,
                                  self._pixels_per_view)
        dd = self.g_alpha.new_zeros(n, 6, 6)
        dq = self.g_alpha.new_zeros(n, 6, 3)
        ww = self.g_alpha.new_zeros(n, 3)
        for lo in range(0, self.plan.num_pairs, chunk):
            hi = min(lo + chunk, self.plan.num_pairs)
            gauss = self.plan.gaussian[lo:hi]
            g = self.g_alpha[lo:hi]
            d = self.d_alpha[lo:hi]
            ws = self.weight[lo:hi, None].expand(-1, 3)
            if self.sqrt_w is not None:
                sw = self.sqrt_w.index_select(0, self.plan.pixel[lo:hi])
                g = g * sw
                ws = ws * sw
            norm = (g * g).sum(1)
            dd = dd.index_add(0, gauss, (norm[:, None] * d)[:, :, None] * d[:, None, :])
            dq = dq.index_add(0, gauss, d[:, :, None] * (ws * g)[:, None, :])
            ww = ww.index_add(0, gauss, ws * ws)
        return self._assemble_moments(dd, dq, ww)

    @staticmethod
    def _assemble_moments(dd: Tensor, dq: Tensor, ww: Tensor) -> Tensor:
        top = torch.cat([dd, dq], 2)
        bottom = torch.cat([dq.transpose(1, 2), torch.diag_embed(ww)], 2)
        return torch.cat([top, bottom], 1)

    def block_partition(self) -> list[tuple[Tensor, Tensor]]:
        """The sets of a Gaussian's slots (indices into ``slots``' columns) whose blocks the
        block-Jacobi preconditioner inverts exactly, each with the feature rows its columns
        can touch: ``[(cols, rows), ...]``, covering every slot once.

        One block of the geometry, the opacity and the DC colour (all that a Gaussian has at SH
        degree 0: the whole block), and one per colour channel of the higher SH coefficients,
        which move only that channel's colour. The channels' coefficients share no feature, so
        only the couplings of the higher coefficients with the geometry and the DC are left
        out, and the factors of three 15 x 15 and one 14 x 14 block (degree 3) cost a
        fifteenth of one 59 x 59 block's.
        """
        device = self.slots.device
        n_i = self.slots.shape[1]
        n_main = min(n_i, GEOMETRY_SLOTS + 4)  # + opacity + DC (3)
        d_rest = (n_i - n_main) // 3
        parts = [(torch.arange(n_main, device=device), torch.arange(NUM_FEATURES, device=device))]
        if d_rest > 0:
            parts += [(n_main + c * d_rest + torch.arange(d_rest, device=device), torch.tensor([6 + c], device=device))
                      for c in range(3)]
        return parts

    def block_diagonal(self, cols: Tensor | None = None, rows: Tensor | None = None,
                       chunk: int = 1 << 17) -> Tensor:
        """Exact per-Gaussian blocks of ``J^T W J`` over the slot columns ``cols`` (default:
        all): ``[b, G, k, k]``. ``rows``: the only features these columns move (the others'
        entries of ``F`` are zero), to skip them."""
        b, v = self._shape[:2]
        g = self.layout.num_gaussians
        m = self.feature_moments(chunk)
        mod = _compiled(self.geo_jac, m, *self._appearance_factors())
        if mod is not None:
            # One pass per block that skips F's zeros, reading F in its factored form: no dense
            # F, no gathered copies of F and M.
            n_i = self.slots.shape[1]
            cols = torch.arange(n_i, device=m.device) if cols is None else cols
            rows = torch.arange(NUM_FEATURES, device=m.device) if rows is None else rows
            k = cols.numel()
            return mod.pj_blocks(self.geo_jac.contiguous(), *self._kernel_appearance(), m.contiguous(),
                                 _index(cols), _index(rows), b, v).reshape(b, g, k, k)
        f = self.feat_jac if cols is None else self.feat_jac.index_select(2, cols)
        if rows is not None:
            f = f.index_select(1, rows)
            m = m.index_select(1, rows).index_select(2, rows)
        k = f.shape[2]
        fm = torch.einsum("nfs,nfg->nsg", f, m)
        blocks = torch.einsum("nsg,ngt->nst", fm, f)
        return blocks.reshape(b, v, g, k, k).sum(1)

    def diagonal(self, chunk: int = 1 << 17, parts: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Exact ``diag(J^T W J)`` as ``[b, n]``.

        ``parts``: ``(blocks, cols)`` from :meth:`block_diagonal` over a partition of the slot
        columns, when already at hand; the Gaussian entries are then read off their diagonals.
        """
        b, v, h, w = self._shape
        g = self.layout.num_gaussians
        n_i = self.slots.shape[1]
        if parts is not None:
            acc = self.geo_jac.new_zeros(b * g, n_i)
            for blocks, cols in parts:
                acc[:, cols] = torch.diagonal(blocks, dim1=-2, dim2=-1).reshape(b * g, -1)
        else:
            m = self.feature_moments(chunk)
            acc = torch.einsum("nfs,nfg,ngs->ns", self.feat_jac, m, self.feat_jac)
            acc = acc.reshape(b, v, g, n_i).sum(1).reshape(b * g, n_i)
        start = self.layout.slices["pose"].start
        out = torch.zeros(b, start, dtype=acc.dtype, device=acc.device)
        out = out.index_copy(1, self.slots.reshape(-1), acc.reshape(b, -1))
        if self.pose_jac is not None:
            # A pose parameter touches every Gaussian of its view: sum the pairs per pixel first.
            npv = self.layout.num_pose_views
            pix = self.pose_jac.new_zeros(self.plan.num_pixels, 3, 6)
            for lo in range(0, self.plan.num_pairs, chunk):
                hi = min(lo + chunk, self.plan.num_pairs)
                pix = pix.index_add(0, self.plan.pixel[lo:hi], self._pair_blocks(lo, hi, self.pose_jac))
            per_view = (pix * pix).sum(1).reshape(b, v, h * w, 6).sum(2)
            out = torch.cat([out, per_view[:, 1:npv + 1].reshape(b, -1)], 1)
        return out
