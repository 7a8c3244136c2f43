"""Public renderer entry points."""

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ShapeError
from ..gaussians.layout import GaussianParams
from ..geometry.cameras import apply_pose_delta
from ..geometry.sh import SHBasis
from .common import Backend, RenderOutput, _broadcast_background, check_render_inputs, project
from .dense import render_dense
from .gsplat_backend import render_gsplat
from .torch_backend import build_plan, composite


def render(
    means: Float[Tensor, "batch gaussian 3"],
    covariances: Float[Tensor, "batch gaussian 3 3"],
    harmonics: Float[Tensor, "batch gaussian 3 d_sh"],
    opacities: Float[Tensor, "batch gaussian"],
    extrinsics: Float[Tensor, "batch view 4 4"],
    intrinsics: Float[Tensor, "batch view 3 3"],
    near: Float[Tensor, "batch view"],
    far: Float[Tensor, "batch view"],
    image_shape: tuple[int, int],
    background_color: Tensor | None = None,
    *,
    sh_basis: SHBasis = "e3nn",
    sh_degree: int | None = None,
    backend: Backend = "torch",
    validate: bool = True,
) -> RenderOutput:
    """Render Gaussians (upstream representation) into every view.

    Args:
        means, covariances, harmonics, opacities: The upstream ``Gaussians`` fields
            (world space, activated opacities in [0, 1]).
        extrinsics: OpenCV camera-to-world ``[b, v, 4, 4]``.
        intrinsics: Normalized K ``[b, v, 3, 3]``.
        near, far: ``[b, v]``; culling happens at ``z <= 0.2 near`` as upstream.
        image_shape: ``(height, width)``.
        background_color: ``[3]``, ``[b, 3]`` or ``[b, v, 3]`` (default black).
        sh_basis: ``"e3nn"`` (pixelSplat/MVSplat/DepthSplat) or ``"3dgs"`` (NoPoSplat).
        sh_degree: Highest SH degree to evaluate (default all present, at most 3).
        backend: ``"torch"``, ``"gsplat"`` or ``"dense"``.
        validate: Check shapes, dtypes, finiteness, SPD covariances and camera conventions
            (turn off only inside loops whose inputs are known to be valid).

    Returns:
        :class:`RenderOutput` with colour ``[b, v, 3, h, w]``, depth and alpha ``[b, v, h, w]``.
        An empty scene, or one entirely behind the cameras, renders the background.
    """
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    check_render_inputs(means, covariances, harmonics, opacities, extrinsics, intrinsics, near,
                        far, image_shape, check_values=validate)
    b, v = extrinsics.shape[:2]
    bg = _broadcast_background(background_color, b, v, means)
    if backend == "torch":
        proj = project(means, covariances, harmonics, opacities, extrinsics, intrinsics, near,
                       image_shape, sh_basis, sh_degree)
        plan = build_plan(proj, image_shape)
        return composite(proj, plan, image_shape, bg)
    if backend == "dense":
        return render_dense(means, covariances, harmonics, opacities, extrinsics, intrinsics,
                            near, far, image_shape, bg, sh_basis, sh_degree)
    if backend == "gsplat":
        return render_gsplat(means, covariances, harmonics, opacities, extrinsics, intrinsics,
                             near, far, image_shape, bg, sh_basis, sh_degree)
    raise ShapeError(f"unknown backend {backend!r}; expected 'torch', 'gsplat' or 'dense'")


def pose_adjusted_extrinsics(
    params: GaussianParams, extrinsics: Float[Tensor, "batch view 4 4"]
) -> Float[Tensor, "batch view 4 4"]:
    """Apply the layout's pose deltas to context views ``1..P`` (view 0 is the reference)."""
    p = params.pose.shape[1]
    if p == 0:
        return extrinsics
    if extrinsics.shape[1] < p + 1:
        raise ShapeError(
            f"the layout has {p} pose deltas but only {extrinsics.shape[1]} views were given "
            f"(deltas apply to views 1..{p}; view 0 is the reference)"
        )
    moved = apply_pose_delta(extrinsics[:, 1:p + 1], params.pose)
    return torch.cat([extrinsics[:, :1], moved, extrinsics[:, p + 1:]], dim=1)


def render_params(
    params: GaussianParams,
    extrinsics: Float[Tensor, "batch view 4 4"],
    intrinsics: Float[Tensor, "batch view 3 3"],
    near: Float[Tensor, "batch view"],
    far: Float[Tensor, "batch view"],
    image_shape: tuple[int, int],
    background_color: Tensor | None = None,
    *,
    apply_pose: bool = True,
    **kwargs,
) -> RenderOutput:
    """Render :class:`~diff3r_plugin.gaussians.GaussianParams` (pose deltas applied to views
    ``1..P`` when ``apply_pose``)."""
    if apply_pose:
        extrinsics = pose_adjusted_extrinsics(params, extrinsics)
    return render(params.means, params.covariances(), params.harmonics, params.opacities(),
                  extrinsics, intrinsics, near, far, image_shape, background_color, **kwargs)
