"""Public renderer entry points."""

import operator

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import DTypeError, NonFiniteError, ShapeError
from ..gaussians.layout import GaussianParams, check_quaternions
from ..geometry.cameras import apply_pose_delta
from ..geometry.sh import MAX_RENDER_DEGREE, SHBasis, degree_from_coeffs, num_coeffs
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
        image_shape: ``(height, width)``, two positive ints.
        background_color: ``[3]``, ``[b, 3]`` or ``[b, v, 3]`` (default black), finite.
        sh_basis: ``"e3nn"`` (pixelSplat/MVSplat/DepthSplat) or ``"3dgs"`` (NoPoSplat).
        sh_degree: Highest SH degree to evaluate (default all present, at most 3); an int in
            ``[0, 3]`` no larger than what ``harmonics`` holds.
        backend: ``"torch"``, ``"gsplat"`` or ``"dense"``.
        validate: Check shapes, dtypes, finiteness, SPD covariances and camera conventions
            (turn off only inside loops whose inputs are known to be valid).

    Dtypes: the Gaussian fields must share one dtype (else :class:`DTypeError`); cameras,
    near/far and the background are cast to it (differentiably).

    Returns:
        :class:`RenderOutput` with colour ``[b, v, 3, h, w]``, depth and alpha ``[b, v, h, w]``.
        An empty scene, or one entirely behind the cameras, renders the background.
    """
    image_shape = _check_image_shape(image_shape)
    _check_sh_degree(sh_degree, harmonics)
    if backend not in ("torch", "dense", "gsplat"):
        raise ShapeError(f"unknown backend {backend!r}; expected 'torch', 'gsplat' or 'dense'")
    extrinsics, intrinsics, near, far, background_color = _cameras_in_dtype_of(
        means, extrinsics, intrinsics, near, far, background_color, check_values=validate)
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


def _check_image_shape(image_shape) -> tuple[int, int]:
    """``(height, width)`` as two positive ints; floats such as 8.5 are an error, not truncated."""
    try:
        h, w = image_shape
    except (TypeError, ValueError):
        raise ShapeError(f"image_shape must be (height, width), got {image_shape!r}") from None
    out = []
    for x in (h, w):
        if isinstance(x, bool):
            raise ShapeError(f"image_shape must be two positive ints, got {image_shape!r}")
        try:
            out.append(operator.index(x))
        except TypeError:
            if isinstance(x, float) and x.is_integer():
                out.append(int(x))
                continue
            raise ShapeError(f"image_shape must be two positive ints, got {image_shape!r}") from None
    return out[0], out[1]


def _check_sh_degree(sh_degree, harmonics) -> None:
    if sh_degree is None or not isinstance(harmonics, Tensor) or harmonics.ndim != 4:
        return
    available = degree_from_coeffs(harmonics.shape[-1])
    if isinstance(sh_degree, bool) or not isinstance(sh_degree, int) or not 0 <= sh_degree <= MAX_RENDER_DEGREE:
        raise ShapeError(f"sh_degree must be an int in [0, {MAX_RENDER_DEGREE}] (the rasterizers "
                         f"evaluate at most degree 3), got {sh_degree!r}")
    if sh_degree > available:
        raise ShapeError(f"sh_degree {sh_degree} needs {num_coeffs(sh_degree)} SH coefficients, "
                         f"harmonics has {harmonics.shape[-1]}")


def _cameras_in_dtype_of(means, extrinsics, intrinsics, near, far, background, *, check_values=True):
    """Cameras, depth range and background cast to the Gaussians' dtype.

    The Gaussians' dtype decides the precision of the render (as the layer casts its context
    views to ``theta0``'s dtype); the cameras are data and follow it, differentiably. Integer
    tensors are not cast (:func:`check_render_inputs` rejects them), and a non-finite
    background is an error: it would paint every uncovered pixel NaN.
    """
    if not isinstance(means, Tensor) or not means.is_floating_point():
        return extrinsics, intrinsics, near, far, background

    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != means.dtype:
            return t.to(means.dtype)
        return t

    if background is not None:
        if not isinstance(background, Tensor):
            background = torch.as_tensor(background, dtype=means.dtype, device=means.device)
        if not background.is_floating_point():
            raise DTypeError(f"background_color must be floating point, got {background.dtype}")
        if check_values and not bool(torch.isfinite(background).all()):
            raise NonFiniteError("background_color contains NaN/Inf: every uncovered pixel would be NaN")
    return cast(extrinsics), cast(intrinsics), cast(near), cast(far), cast(background)


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
    check_quaternions(params.quats, "params.quats")
    if apply_pose:
        extrinsics = pose_adjusted_extrinsics(params, extrinsics)
    return render(params.means, params.covariances(), params.harmonics, params.opacities(),
                  extrinsics, intrinsics, near, far, image_shape, background_color, **kwargs)
