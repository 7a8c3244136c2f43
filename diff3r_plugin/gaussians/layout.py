"""The optimizable Gaussian layout: the one place where it is defined.

Per Gaussian the layer optimizes ``means`` (3), ``log_scales`` (3), rotation ``quats``
(4, ``wxyz``, normalized when used), ``opacity_logits`` (1) and SH coefficients, split into the
DC term ``sh_dc`` (3) and the higher degrees ``sh_rest`` (3 x ((degree + 1)^2 - 1)); per
non-reference context view of a pose-free model there is a camera ``pose`` delta (6: se(3)
translation then rotation, see :func:`diff3r_plugin.geometry.cameras.se3_exp`).

A batch element flattens to one vector, group-major (all means, then all log-scales, ...), so
that each attribute group is a contiguous slice: per-group learning rates and the uncertainty
weights Lambda use the same slices.

Upstream encoders emit only world-space covariances. :func:`from_upstream` recovers scales and
rotations by a symmetric eigen-decomposition (exact: ``to_upstream(from_upstream(x)) == x``),
with a backward that stays finite for (near-)isotropic covariances, where the eigenvectors are
not unique (see :class:`_SafeEigh`).
"""

import operator
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import (ConfigError, DTypeError, InvalidCovarianceError, LayoutMismatchError,
                      NonFiniteError, ShapeError, ValueRangeError)
from ..geometry.sh import MAX_RENDER_DEGREE, degree_from_coeffs, num_coeffs

GROUPS = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest", "pose")
GaussianGroup = Literal["means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest", "pose"]


@dataclass(frozen=True)
class GaussianLayout:
    """Sizes of the flat parameter vector of one batch element."""

    num_gaussians: int
    sh_degree: int = 0
    num_pose_views: int = 0

    def __post_init__(self) -> None:
        for name in ("num_gaussians", "sh_degree", "num_pose_views"):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                exact = operator.index(value)
            except TypeError:
                raise ShapeError(f"GaussianLayout.{name} must be an int, got {value!r} "
                                 f"({type(value).__name__})") from None
            object.__setattr__(self, name, exact)  # frozen dataclass: normalize numpy/torch ints
        if self.num_gaussians < 0 or self.num_pose_views < 0:
            raise ShapeError(f"invalid layout {self}")
        if not 0 <= self.sh_degree <= MAX_RENDER_DEGREE:
            raise ShapeError(
                f"sh_degree must be in [0, {MAX_RENDER_DEGREE}] (the rasterizers evaluate at most "
                f"degree 3), got {self.sh_degree}"
            )

    @property
    def d_sh(self) -> int:
        return num_coeffs(self.sh_degree)

    def group_shape(self, group: str) -> tuple[int, ...]:
        g = self.num_gaussians
        return {
            "means": (g, 3),
            "log_scales": (g, 3),
            "quats": (g, 4),
            "opacity_logits": (g,),
            "sh_dc": (g, 3, 1),
            "sh_rest": (g, 3, self.d_sh - 1),
            "pose": (self.num_pose_views, 6),
        }[group]

    def group_numel(self, group: str) -> int:
        n = 1
        for s in self.group_shape(group):
            n *= s
        return n

    @property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for group in GROUPS:
            n = self.group_numel(group)
            out[group] = slice(start, start + n)
            start += n
        return out

    @property
    def numel(self) -> int:
        return sum(self.group_numel(g) for g in GROUPS)

    def group_index(self, device: torch.device | None = None) -> Tensor:
        """``[numel]`` int64: which group (index into ``GROUPS``) each entry belongs to."""
        return torch.cat([
            torch.full((self.group_numel(g),), i, dtype=torch.long, device=device)
            for i, g in enumerate(GROUPS)
        ])

    def per_group(
        self, values: dict[str, float], *, batch: int = 1, dtype: torch.dtype = torch.float32,
        device: torch.device | None = None, default: float | None = None,
    ) -> Float[Tensor, "batch n"]:
        """A ``[batch, numel]`` vector holding one constant per group (Lambda, learning rates)."""
        unknown = set(values) - set(GROUPS)
        if unknown:
            raise LayoutMismatchError(f"unknown group(s) {sorted(unknown)}; groups are {GROUPS}")
        parts = []
        for g in GROUPS:
            v = values.get(g, default)
            if v is None and self.group_numel(g) > 0:
                raise LayoutMismatchError(f"no value given for group {g!r}")
            parts.append(torch.full((self.group_numel(g),), 0.0 if v is None else float(v),
                                    dtype=dtype, device=device))
        return torch.cat(parts).expand(batch, -1).clone()

    def split(self, vector: Float[Tensor, "batch n"]) -> dict[str, Tensor]:
        """Views of a flat ``[batch, numel]`` vector, one per group, in group shape."""
        self.check_vector(vector)
        b = vector.shape[0]
        return {g: vector[:, s].reshape(b, *self.group_shape(g)) for g, s in self.slices.items()}

    def check_vector(self, vector: Tensor, name: str = "vector") -> None:
        if vector.ndim != 2 or vector.shape[1] != self.numel:
            raise LayoutMismatchError(
                f"{name} has shape {tuple(vector.shape)}, but this layout ({self}) needs "
                f"[batch, {self.numel}]"
            )


@dataclass
class GaussianParams:
    """Batched Gaussian parameters in the optimizable layout (see module docstring)."""

    means: Float[Tensor, "batch gaussian 3"]
    log_scales: Float[Tensor, "batch gaussian 3"]
    quats: Float[Tensor, "batch gaussian 4"]
    opacity_logits: Float[Tensor, "batch gaussian"]
    sh_dc: Float[Tensor, "batch gaussian 3 1"]
    sh_rest: Float[Tensor, "batch gaussian 3 d_rest"]
    pose: Float[Tensor, "batch pose_view 6"] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.pose is None:
            self.pose = self.means.new_zeros(self.means.shape[0], 0, 6)
        b, g = self.means.shape[:2]
        expected = {
            "means": (b, g, 3), "log_scales": (b, g, 3), "quats": (b, g, 4),
            "opacity_logits": (b, g), "sh_dc": (b, g, 3, 1),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ShapeError(f"GaussianParams.{name} must have shape {shape}, got {tuple(t.shape)}")
        if self.sh_rest.shape[:3] != (b, g, 3):
            raise ShapeError(f"GaussianParams.sh_rest must be [{b}, {g}, 3, d-1], got {tuple(self.sh_rest.shape)}")
        degree_from_coeffs(self.sh_rest.shape[3] + 1)
        if self.pose.ndim != 3 or self.pose.shape[0] != b or self.pose.shape[2] != 6:
            raise ShapeError(f"GaussianParams.pose must be [{b}, views, 6], got {tuple(self.pose.shape)}")

    @property
    def layout(self) -> GaussianLayout:
        return GaussianLayout(
            num_gaussians=self.means.shape[1],
            sh_degree=degree_from_coeffs(self.sh_rest.shape[3] + 1),
            num_pose_views=self.pose.shape[1],
        )

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def harmonics(self) -> Float[Tensor, "batch gaussian 3 d_sh"]:
        return torch.cat([self.sh_dc, self.sh_rest], dim=-1)

    def flatten(self) -> Float[Tensor, "batch n"]:
        b = self.batch_size
        return torch.cat([getattr(self, g).reshape(b, -1) for g in GROUPS], dim=1)

    @classmethod
    def unflatten(cls, vector: Float[Tensor, "batch n"], layout: GaussianLayout) -> "GaussianParams":
        return cls(**layout.split(vector))

    def scales(self) -> Float[Tensor, "batch gaussian 3"]:
        return self.log_scales.exp()

    def opacities(self) -> Float[Tensor, "batch gaussian"]:
        return torch.sigmoid(self.opacity_logits)

    def rotations(self) -> Float[Tensor, "batch gaussian 3 3"]:
        return quat_to_rotmat(self.quats)

    def covariances(self) -> Float[Tensor, "batch gaussian 3 3"]:
        return build_covariance(self.log_scales, self.quats)

    def map(self, fn) -> "GaussianParams":
        return GaussianParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


def check_quaternions(quats: Float[Tensor, "*batch 4"], name: str = "quats") -> None:
    """Raise :class:`ValueRangeError` for a zero quaternion.

    ``q = 0`` has no rotation: its normalization ``q / |q|`` is undefined, and so is every
    derivative through it. It is rejected wherever quaternions enter the plugin (the layer's
    ``theta0``, :func:`~diff3r_plugin.render.api.render_params`, :func:`to_upstream`) rather than
    silently replaced by the identity. Any other finite quaternion is fine, however small or
    large (see :func:`quat_to_rotmat`).
    """
    zero = quats.detach().abs().amax(-1) == 0
    if bool(zero.any()):
        first = torch.nonzero(zero)[0].tolist()
        raise ValueRangeError(
            f"{name}: {int(zero.sum())} quaternion(s) are exactly zero (first at index {first}); a "
            "zero quaternion has no rotation. Initialize rotations as [1, 0, 0, 0] (identity)")


def quat_to_rotmat(quats: Float[Tensor, "*batch 4"]) -> Float[Tensor, "*batch 3 3"]:
    """Rotation matrices from (not necessarily unit) ``wxyz`` quaternions (normalized first).

    ``q / |q|`` is computed as ``u / |u|`` with ``u = q / max|q|`` (the max held constant, which
    leaves the value and the derivative of the scale-invariant ``q / |q|`` unchanged), so
    quaternions of 1e-30 or 1e20 do not under- or overflow ``|q|^2`` in float32. Zero
    quaternions are rejected at the entry points (:func:`check_quaternions`); here they map to
    the identity only so that an iterate can never produce a NaN.
    """
    peak = quats.detach().abs().amax(-1, keepdim=True)
    u = quats / torch.where(peak > 0, peak, torch.ones_like(peak))
    q = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)


def rotmat_to_quat(rot: Float[Tensor, "*batch 3 3"]) -> Float[Tensor, "*batch 4"]:
    """``wxyz`` unit quaternion (w >= 0) of proper rotation matrices.

    Shepperd's method: choose the largest of ``w, x, y, z`` as pivot so the square root and the
    division are well conditioned for every rotation.
    """
    m = rot
    t = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([t, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)
    pivot = cands.argmax(-1)
    r = (1 + 2 * cands.gather(-1, pivot[..., None])[..., 0] - t).clamp_min(1e-12).sqrt()
    s = 0.5 / r
    # Each row: quaternion when the pivot is w, x, y or z.
    q_w = torch.stack([0.5 * r, (m[..., 2, 1] - m[..., 1, 2]) * s, (m[..., 0, 2] - m[..., 2, 0]) * s,
                       (m[..., 1, 0] - m[..., 0, 1]) * s], -1)
    q_x = torch.stack([(m[..., 2, 1] - m[..., 1, 2]) * s, 0.5 * r, (m[..., 0, 1] + m[..., 1, 0]) * s,
                       (m[..., 0, 2] + m[..., 2, 0]) * s], -1)
    q_y = torch.stack([(m[..., 0, 2] - m[..., 2, 0]) * s, (m[..., 0, 1] + m[..., 1, 0]) * s, 0.5 * r,
                       (m[..., 1, 2] + m[..., 2, 1]) * s], -1)
    q_z = torch.stack([(m[..., 1, 0] - m[..., 0, 1]) * s, (m[..., 0, 2] + m[..., 2, 0]) * s,
                       (m[..., 1, 2] + m[..., 2, 1]) * s, 0.5 * r], -1)
    q = torch.stack([q_w, q_x, q_y, q_z], -2).gather(
        -2, pivot[..., None, None].expand(*pivot.shape, 1, 4))[..., 0, :]
    sign = torch.where(q[..., :1] < 0, -torch.ones_like(q[..., :1]), torch.ones_like(q[..., :1]))
    return q * sign


def build_covariance(
    log_scales: Float[Tensor, "*batch 3"], quats: Float[Tensor, "*batch 4"]
) -> Float[Tensor, "*batch 3 3"]:
    """``R diag(s^2) R^T`` (the upstream ``build_covariance``, with scales in log space)."""
    rot = quat_to_rotmat(quats)
    s2 = (2 * log_scales).exp()
    return (rot * s2[..., None, :]) @ rot.transpose(-1, -2)


class _SafeEigh(torch.autograd.Function):
    """Symmetric eigen-decomposition whose backward stays finite for repeated eigenvalues.

    The textbook backward has ``1 / (lambda_j - lambda_i)`` factors. For an isotropic (or
    axially symmetric) covariance the eigenvectors inside the degenerate eigenspace are
    arbitrary, and a change of the rotation parameters within it does not change the
    covariance, so the corresponding gradient terms are dropped (``F_ij = 0`` when the gap is
    below ``gap_tol`` relative to the largest eigenvalue). Everywhere else this equals the
    exact derivative.
    """

    @staticmethod
    def forward(ctx, sym: Tensor, gap_tol: float):  # type: ignore[override]
        evals, evecs = torch.linalg.eigh(sym)
        ctx.save_for_backward(evals, evecs)
        ctx.gap_tol = gap_tol
        return evals, evecs

    @staticmethod
    def backward(ctx, g_evals: Tensor, g_evecs: Tensor):  # type: ignore[override]
        evals, evecs = ctx.saved_tensors
        vt = evecs.transpose(-1, -2)
        gap = evals[..., None, :] - evals[..., :, None]  # gap[i, j] = l_j - l_i
        scale = evals.abs().amax(-1, keepdim=True)[..., None].clamp_min(1e-30)
        degenerate = gap.abs() <= ctx.gap_tol * scale
        f = torch.where(degenerate, torch.zeros_like(gap), 1.0 / torch.where(degenerate, torch.ones_like(gap), gap))
        inner = torch.diag_embed(g_evals) + f * (vt @ g_evecs)
        grad = evecs @ inner @ vt
        grad = 0.5 * (grad + grad.transpose(-1, -2))
        return grad, None


@dataclass
class UpstreamExtras:
    """What the layout does not optimize but needs to give back to the upstream class.

    ``harmonics_high``: coefficients above ``sh_degree`` (e.g. upstream degree 4, which the
    rasterizers ignore); they are passed through untouched. ``num_projected``: how many
    covariances were projected to SPD (only with ``on_invalid="project"``);
    ``num_opacity_clamped``: opacities clamped into [eps, 1-eps] before the logit;
    ``num_scales_clamped``: eigenvalues of valid covariances that the dtype cannot resolve
    (below ``finfo.tiny`` times the largest entry: very flat Gaussians in float32), raised to
    that floor before the log (with a warning).
    """

    harmonics_high: Float[Tensor, "batch gaussian 3 d_high"]
    num_projected: int = 0
    num_opacity_clamped: int = 0
    num_scales_clamped: int = 0


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{name} contains {bad} NaN/Inf value(s)")


def check_covariances(
    covariances: Float[Tensor, "*batch 3 3"], *, rel_tol: float = 1e-13, name: str = "covariances"
) -> Bool[Tensor, "*batch"]:
    """Boolean mask ``[...]`` of covariances that are not symmetric positive definite.

    The one SPD criterion of the package (the renderers' input check uses it too), in float64:
    with ``m = max_ij |C_ij|``, a covariance is accepted when ``|C - C^T| <= 1e-4 m`` entrywise
    and ``sym(C) - rel_tol m I`` has a Cholesky factor, i.e. ``lambda_min > rel_tol m``
    (``m <= lambda_max <= 3 m``). Flat but valid Gaussians (scale ratios of 1e4 and more, i.e.
    eigenvalue ratios of 1e8) are accepted; a zero or negative eigenvalue is not.
    """
    c = covariances.detach().double()
    asym = (c - c.transpose(-1, -2)).abs().amax((-1, -2))
    mag = c.abs().amax((-1, -2)).clamp_min(1e-30)
    shifted = 0.5 * (c + c.transpose(-1, -2)) - (rel_tol * mag)[..., None, None] * torch.eye(
        3, dtype=c.dtype, device=c.device)
    _, info = torch.linalg.cholesky_ex(shifted)
    return (asym > 1e-4 * mag) | (info != 0)


def from_upstream(
    means: Float[Tensor, "batch gaussian 3"],
    covariances: Float[Tensor, "batch gaussian 3 3"],
    harmonics: Float[Tensor, "batch gaussian 3 d_sh"],
    opacities: Float[Tensor, "batch gaussian"],
    *,
    sh_degree: int | None = None,
    num_pose_views: int = 0,
    on_invalid: Literal["raise", "project"] = "raise",
    opacity_eps: float = 1e-6,
    eig_gap_tol: float = 1e-6,
) -> tuple[GaussianParams, UpstreamExtras]:
    """Convert the upstream representation to the optimizable layout, differentiably.

    Args:
        means, covariances, harmonics, opacities: Fields of the upstream ``Gaussians``.
        sh_degree: Degree kept in the layout (default: what ``harmonics`` holds, at most 3).
        num_pose_views: Number of pose deltas (non-reference context views) to allocate.
        on_invalid: ``"raise"`` raises :class:`InvalidCovarianceError` for a covariance that is
            not symmetric positive definite; ``"project"`` symmetrizes and clamps its
            eigenvalues to ``1e-12 * max`` and reports the count in the returned extras. Any
            other value raises :class:`ConfigError`.
        opacity_eps: Opacities are clamped to ``[eps, 1 - eps]`` before the logit.

    Returns:
        The parameters and the pass-through extras needed by :func:`to_upstream`. The
        parameters are copies: editing them in place leaves the inputs unchanged.

    Raises:
        DTypeError: A field is not a floating-point tensor, or the fields' dtypes differ.
        ShapeError: Inconsistent shapes, or ``sh_degree`` outside ``[0, 3]`` / above what
            ``harmonics`` holds.
        NonFiniteError: A field holds NaN/Inf.
    """
    if on_invalid not in ("raise", "project"):
        raise ConfigError(f"on_invalid must be 'raise' or 'project', got {on_invalid!r}")
    named = (("means", means), ("covariances", covariances), ("harmonics", harmonics),
             ("opacities", opacities))
    for name, t in named:
        _check_float(name, t)
    for name, t in named[1:]:
        if t.dtype != means.dtype:
            raise DTypeError(f"means are {means.dtype} but {name} are {t.dtype}: the upstream "
                             "Gaussians' fields must share one dtype")
    if sh_degree is not None and (isinstance(sh_degree, bool) or not isinstance(sh_degree, int)
                                  or not 0 <= sh_degree <= MAX_RENDER_DEGREE):
        raise ShapeError(f"sh_degree must be an int in [0, {MAX_RENDER_DEGREE}] (the rasterizers "
                         f"evaluate at most degree 3), got {sh_degree!r}")
    if isinstance(num_pose_views, bool) or not isinstance(num_pose_views, int) or num_pose_views < 0:
        raise ShapeError(f"num_pose_views must be an int >= 0, got {num_pose_views!r}")
    if means.ndim != 3 or means.shape[-1] != 3:
        raise ShapeError(f"means must be [batch, gaussian, 3], got {tuple(means.shape)}")
    b, g = means.shape[:2]
    if tuple(covariances.shape) != (b, g, 3, 3):
        raise ShapeError(f"covariances must be [{b}, {g}, 3, 3], got {tuple(covariances.shape)}")
    if harmonics.ndim != 4 or harmonics.shape[:3] != (b, g, 3):
        raise ShapeError(f"harmonics must be [{b}, {g}, 3, d_sh], got {tuple(harmonics.shape)}")
    if tuple(opacities.shape) != (b, g):
        raise ShapeError(f"opacities must be [{b}, {g}], got {tuple(opacities.shape)}")
    available = degree_from_coeffs(harmonics.shape[-1])
    degree = min(available, MAX_RENDER_DEGREE) if sh_degree is None else sh_degree
    if degree > available:
        raise ShapeError(f"sh_degree {degree} needs {num_coeffs(degree)} coefficients, harmonics has {harmonics.shape[-1]}")

    bad = check_covariances(covariances) if g else torch.zeros(b, g, dtype=torch.bool)
    num_projected = int(bad.sum())
    sym = 0.5 * (covariances + covariances.transpose(-1, -2))
    if num_projected and on_invalid == "raise":
        idx = torch.nonzero(bad)[0].tolist()
        raise InvalidCovarianceError(
            f"{num_projected} covariance(s) are not symmetric positive definite (first: batch "
            f"{idx[0]}, gaussian {idx[1]}: {covariances[idx[0], idx[1]].detach().cpu().tolist()}); "
            "pass on_invalid='project' to clamp their eigenvalues instead"
        )
    # Decompose sym / max|sym| (the max held constant: the derivative is unchanged) so that tiny
    # or huge covariances (1e-30 I in float32) are resolved as well as unit ones.
    peak = sym.detach().abs().amax((-1, -2), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    evals, evecs = _SafeEigh.apply(sym / peak, eig_gap_tol)
    if num_projected:
        floor = (evals[..., -1:].abs() * 1e-12).clamp_min(torch.finfo(evals.dtype).tiny)
        evals = torch.maximum(evals, floor)
    tiny = torch.finfo(evals.dtype).tiny
    num_scales_clamped = int((evals.detach() < tiny).sum())
    if num_scales_clamped:
        warnings.warn(
            f"from_upstream: {num_scales_clamped} covariance eigenvalue(s) are below what "
            f"{evals.dtype} resolves relative to their covariance (flat Gaussians); they were "
            f"raised to {tiny:.1e} x max before the log (UpstreamExtras.num_scales_clamped)",
            RuntimeWarning, stacklevel=2)
    # eigh gives an orthogonal matrix; make it a proper rotation (det = +1).
    det = torch.linalg.det(evecs.detach())
    flip = torch.ones_like(evecs[..., :1, :])
    flip[..., 0, 2] = torch.where(det < 0, -1.0, 1.0)
    rot = evecs * flip
    log_scales = 0.5 * (evals.clamp_min(tiny).log() + peak[..., 0].log())
    quats = rotmat_to_quat(rot)

    clamped = opacities.clamp(opacity_eps, 1 - opacity_eps)
    num_clamped = int((clamped.detach() != opacities.detach()).sum())
    opacity_logits = torch.logit(clamped)

    n = num_coeffs(degree)
    # Copies (still differentiable), not views: an in-place edit of the returned parameters
    # must not change the caller's upstream Gaussians.
    params = GaussianParams(
        means=means.clone(),
        log_scales=log_scales,
        quats=quats,
        opacity_logits=opacity_logits,
        sh_dc=harmonics[..., :1].clone(),
        sh_rest=harmonics[..., 1:n].clone(),
        pose=means.new_zeros(b, num_pose_views, 6),
    )
    return params, UpstreamExtras(harmonics[..., n:].clone(), num_projected, num_clamped,
                                  num_scales_clamped)


def to_upstream(
    params: GaussianParams, extras: UpstreamExtras | None = None
) -> tuple[Float[Tensor, "batch gaussian 3"], Float[Tensor, "batch gaussian 3 3"],
           Float[Tensor, "batch gaussian 3 d_sh"], Float[Tensor, "batch gaussian"]]:
    """Back to ``(means, covariances, harmonics, opacities)`` of the upstream ``Gaussians``.

    Raises :class:`ValueRangeError` for a zero quaternion (see :func:`check_quaternions`)."""
    check_quaternions(params.quats, "params.quats")
    harmonics = params.harmonics
    if extras is not None and extras.harmonics_high.shape[-1] > 0:
        harmonics = torch.cat([harmonics, extras.harmonics_high.to(harmonics)], dim=-1)
    return params.means, params.covariances(), harmonics, params.opacities()


def random_params(
    batch: int, num_gaussians: int, *, sh_degree: int = 0, num_pose_views: int = 0,
    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
    center: tuple[float, float, float] = (0.0, 0.0, 3.0), spread: float = 1.0,
    scale_range: tuple[float, float] = (0.02, 0.08),
) -> GaussianParams:
    """Seeded random Gaussians (used by tests, benchmarks and examples)."""
    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, dtype=dtype)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    c = torch.tensor(center, dtype=dtype)
    means = c + spread * (2 * rand(batch, num_gaussians, 3) - 1)
    lo, hi = scale_range
    log_scales = torch.log(lo + (hi - lo) * rand(batch, num_gaussians, 3))
    quats = randn(batch, num_gaussians, 4)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    opacity_logits = 2 * randn(batch, num_gaussians)
    d = num_coeffs(sh_degree)
    sh = 0.5 * randn(batch, num_gaussians, 3, d)
    sh[..., 1:] *= 0.3
    pose = torch.zeros(batch, num_pose_views, 6, dtype=dtype)
    return GaussianParams(means, log_scales, quats, opacity_logits, sh[..., :1], sh[..., 1:], pose)


__all__ = [
    "GROUPS", "GaussianLayout", "GaussianParams", "UpstreamExtras", "build_covariance",
    "check_covariances", "check_quaternions", "from_upstream", "quat_to_rotmat", "random_params",
    "rotmat_to_quat", "to_upstream",
]
