"""Model-agnostic uncertainty head: per-Gaussian features -> proximal weights Lambda.

The head maps a descriptor of every Gaussian (``[b, g, in_features]``) to Lambda laid out
exactly like the flat parameter vector of :class:`~diff3r_plugin.gaussians.GaussianLayout`
(group-major, see ``layout.slices``), so ``lam`` can be passed to
:func:`~diff3r_plugin.layer.diff3r_layer` next to ``theta0 = params.flatten()``.

Values are ``floor + softplus(x)``, so Lambda is strictly positive (the IFT Hessian
``J^T J + diag(Lambda)`` is then SPD). The last layer starts with zero weights and a bias of
``softplus^-1(init - floor)``: at initialisation Lambda equals ``init`` everywhere, i.e. the
layer starts as a TTO with a constant proximal weight, and training moves away from it only as
far as the outer loss asks.

Camera pose deltas (``pose`` group, pose-free models) are not tied to one Gaussian; they get
one learned scalar per group (shared by all pose entries), not a per-Gaussian prediction.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError, ValueRangeError
from ..geometry.sh import C0
from ..gaussians.layout import GROUPS, GaussianLayout, GaussianParams

__all__ = ["UncertaintyHead", "features_from_gaussians", "NUM_GAUSSIAN_FEATURES",
           "inverse_softplus"]

# Per-Gaussian groups (everything but the pose deltas).
_GAUSSIAN_GROUPS = tuple(g for g in GROUPS if g != "pose")


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) == y`` (``y > 0``), numerically stable for large ``y``."""
    if not y > 0:
        raise ValueRangeError(f"inverse_softplus needs y > 0, got {y}")
    if y > 20:
        return y + math.log(-math.expm1(-y))
    return math.log(math.expm1(y))


class UncertaintyHead(nn.Module):
    """Per-Gaussian MLP predicting Lambda in the layout's flat order.

    Args:
        in_features: Size of the per-Gaussian descriptor.
        sh_degree: SH degree of the layout (sets the size of the ``sh_rest`` group).
        num_pose_views: Pose deltas in the layout (pose-free models: context views - 1).
        granularity: ``"group"``: one Lambda per Gaussian and attribute group, broadcast to the
            group's entries; ``"parameter"``: one per scalar parameter.
        floor: Lower bound of Lambda (added after the softplus).
        init: Value of every Lambda at initialisation (must exceed ``floor``).
        hidden: Hidden width of the two-layer MLP.
    """

    def __init__(self, in_features: int, sh_degree: int, num_pose_views: int = 0, *,
                 granularity: Literal["group", "parameter"] = "group", floor: float = 1e-4,
                 init: float = 1.0, hidden: int = 32):
        super().__init__()
        if granularity not in ("group", "parameter"):
            raise ConfigError(f"UncertaintyHead: granularity must be 'group' or 'parameter', got {granularity!r}")
        for name, value in (("floor", floor), ("init", init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"UncertaintyHead: {name} must be a finite float, got {value!r}")
        if not floor > 0:
            raise ConfigError(f"UncertaintyHead: floor must be > 0 (Lambda = floor + softplus(x) must "
                              f"stay strictly positive), got {floor}")
        if not init > floor:
            raise ConfigError(f"UncertaintyHead: init ({init}) must be > floor ({floor})")
        for name, value in (("in_features", in_features), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"UncertaintyHead: {name} must be an int >= 1, got {value!r}")
        self.init_kwargs = dict(in_features=int(in_features), sh_degree=int(sh_degree),
                                num_pose_views=int(num_pose_views), granularity=granularity,
                                floor=float(floor), init=float(init), hidden=int(hidden))
        self.in_features = int(in_features)
        self.sh_degree = int(sh_degree)
        self.num_pose_views = int(num_pose_views)
        self.granularity = granularity
        self.floor = float(floor)
        self.init = float(init)
        probe = GaussianLayout(1, sh_degree, 0)
        # Per-Gaussian output size of each group.
        self._sizes = {g: (1 if granularity == "group" else probe.group_numel(g))
                       for g in _GAUSSIAN_GROUPS}
        out = sum(self._sizes.values())
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
        )
        self.out = nn.Linear(hidden, out)
        bias = inverse_softplus(init - floor)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, bias)
        # One scalar for the whole pose group.
        self.pose_logit = nn.Parameter(torch.tensor(bias))

    def layout(self, num_gaussians: int) -> GaussianLayout:
        return GaussianLayout(num_gaussians, self.sh_degree, self.num_pose_views)

    def forward(self, features: Float[Tensor, "batch gaussian feature"]) -> Float[Tensor, "batch n"]:
        if features.ndim != 3 or features.shape[-1] != self.in_features:
            raise ShapeError(f"features must be [batch, gaussian, {self.in_features}], "
                             f"got {tuple(features.shape)}")
        b, g = features.shape[:2]
        layout = self.layout(g)
        raw = self.out(self.mlp(features))  # [b, g, out]
        parts, start = [], 0
        for group in _GAUSSIAN_GROUPS:
            k = self._sizes[group]
            chunk = raw[..., start:start + k]
            start += k
            per_gaussian = layout.group_numel(group) // max(g, 1) if g else 0
            if self.granularity == "group":
                chunk = chunk.expand(b, g, per_gaussian)
            # The layout flattens [g, *shape] row-major, i.e. Gaussian-major inside a group.
            parts.append(chunk.reshape(b, g * per_gaussian))
        parts.append(self.pose_logit.expand(b, layout.group_numel("pose")))
        lam = self.floor + F.softplus(torch.cat(parts, dim=1))
        return lam

    def as_params(self, lam: Float[Tensor, "batch n"], num_gaussians: int) -> GaussianParams:
        """Lambda in group shape (for inspection and logging)."""
        return GaussianParams.unflatten(lam, self.layout(num_gaussians))


NUM_GAUSSIAN_FEATURES = 14


def features_from_gaussians(
    params: GaussianParams,
    context_images: Tensor | None = None,
    context_extrinsics: Tensor | None = None,
    *,
    pixel_aligned: bool | None = None,
    extra: Tensor | None = None,
) -> Float[Tensor, "batch gaussian feature"]:
    """A model-agnostic per-Gaussian descriptor for :class:`UncertaintyHead`.

    Features (14 + extra): opacity (1), log-scales (3, sorted), log distance to the reference
    camera (1; camera 0 of ``context_extrinsics`` or the world origin), DC colour
    ``0.5 + C0 * sh_dc`` (3), magnitude of the higher SH (1), the context pixel colour where the
    Gaussians are pixel-aligned (3; zeros otherwise), the absolute colour difference between
    the Gaussian's DC colour and its pixel (1), and a flag saying whether the pixel colour is
    present (1). Nothing is detached here: gradients flow back into ``params`` (and so into the
    encoder) unless the caller passes detached parameters (the tiny encoders do, and append
    their own non-detached extras such as depth confidence).

    Args:
        params: Gaussians in the layout.
        context_images: ``[b, v, 3, h, w]`` in [0, 1] (optional).
        context_extrinsics: ``[b, v, 4, 4]`` c2w (optional; for the distance feature).
        pixel_aligned: Whether Gaussian ``i`` belongs to pixel ``i`` of the views in order
            (``g == v*h*w``, the MVSplat/NoPoSplat layout). Default: inferred from the counts.
        extra: Optional model-specific features ``[b, g, k]`` appended at the end.
    """
    b, g = params.means.shape[:2]
    opacity = params.opacities()[..., None]
    log_scales = params.log_scales.sort(dim=-1).values
    if context_extrinsics is not None:
        origin = context_extrinsics[:, 0, :3, 3][:, None, :]
    else:
        origin = params.means.new_zeros(b, 1, 3)
    dist = (params.means - origin).norm(dim=-1, keepdim=True).clamp_min(1e-6).log()
    colour = 0.5 + C0 * params.sh_dc[..., 0]
    rest = params.sh_rest.pow(2).sum((-1, -2)).add(1e-12).sqrt()[..., None]
    pixel = params.means.new_zeros(b, g, 3)
    flag = params.means.new_zeros(b, g, 1)
    if context_images is not None:
        v, _, h, w = context_images.shape[1:]
        aligned = (g == v * h * w) if pixel_aligned is None else pixel_aligned
        if aligned:
            if g != v * h * w:
                raise ShapeError(f"pixel_aligned=True needs g == v*h*w = {v * h * w}, got {g}")
            pixel = rearrange(context_images, "b v c h w -> b (v h w) c").to(params.means)
            flag = flag + 1
    diff = (colour - pixel).abs().mean(-1, keepdim=True) * flag
    feats = [opacity, log_scales, dist, colour, rest, pixel, diff, flag]
    if extra is not None:
        feats.append(extra)
    return torch.cat(feats, dim=-1)
