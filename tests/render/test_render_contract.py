"""Contract tests of the renderers: torch backend vs the dense reference,
derivatives (reverse mode, gradcheck, forward mode), the upstream projection / SH /
compositing conventions checked against hand-computed numbers, per-Gaussian culling, and
typed errors on bad input.

Everything runs in float64 on tiny scenes so that the whole file stays a few seconds on CPU.
"""

import math

import pytest
import torch

from diff3r_plugin.data.synthetic import make_cameras, make_scene
from diff3r_plugin.errors import (BackendUnavailableError, CameraConventionError, Diff3RError,
                                  DTypeError, InvalidCovarianceError, NonFiniteError, ShapeError)
from diff3r_plugin.gaussians.layout import GaussianParams, build_covariance, random_params
from diff3r_plugin.geometry.sh import C0, C1, sh_basis_values
from diff3r_plugin.render import build_plan, project, render, render_params

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def _scene_args(scene):
    p = scene.params
    return (p.means, p.covariances(), p.harmonics, p.opacities())


def _cams(scene):
    return (scene.extrinsics, scene.intrinsics, scene.near, scene.far, scene.image_shape)


def _single_camera(size: int = 9, near: float = 1.0, fx: float = 1.0, fy: float = 1.0,
                   dtype=F64):
    """Identity c2w (OpenCV), normalized K with a centred principal point, b = v = 1."""
    ext = torch.eye(4, dtype=dtype)[None, None]
    k = torch.tensor([[fx, 0.0, 0.5], [0.0, fy, 0.5], [0.0, 0.0, 1.0]], dtype=dtype)[None, None]
    return ext, k, torch.full((1, 1), near, dtype=dtype), torch.full((1, 1), 100.0, dtype=dtype), (size, size)


def _gaussians(positions, scale=0.01, opacity=0.9, dc=None, dtype=F64):
    """Isotropic Gaussians at the given world positions (b = 1, degree-0 SH)."""
    means = torch.tensor(positions, dtype=dtype)[None]
    g = means.shape[1]
    cov = (scale ** 2) * torch.eye(3, dtype=dtype).expand(1, g, 3, 3).clone()
    if dc is None:
        dc = torch.zeros(g, 3, dtype=dtype)
    harm = torch.as_tensor(dc, dtype=dtype).reshape(1, g, 3, 1)
    opac = torch.as_tensor(opacity, dtype=dtype).expand(g).reshape(1, g).clone()
    return means, cov, harm, opac


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _weighted_loss(out, weights):
    wc, wd, wa = weights
    return (out.color * wc).sum() + (out.depth * wd).sum() + (out.alpha * wa).sum()


def _grads(backend, args, cams, weights, bg=None, sh_basis="e3nn", sh_degree=None):
    args = [a.detach().clone().requires_grad_(True) for a in args]
    out = render(*args, *cams, bg, sh_basis=sh_basis, sh_degree=sh_degree, backend=backend)
    return out, torch.autograd.grad(_weighted_loss(out, weights), args)


def _random_weights(b, v, h, w, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(b, v, 3, h, w, generator=gen, dtype=F64),
            torch.randn(b, v, h, w, generator=gen, dtype=F64),
            torch.randn(b, v, h, w, generator=gen, dtype=F64))


# --------------------------------------------------------- torch backend vs dense reference


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
@pytest.mark.parametrize("sh_basis", ["e3nn", "3dgs"])
def test_torch_matches_dense_forward_and_gradients(seed, sh_degree, sh_basis):
    scene = make_scene(30, 10, 1, seed=100 * seed + sh_degree, sh_degree=sh_degree, dtype=F64)
    args, cams = _scene_args(scene), _cams(scene)
    h, w = scene.image_shape
    weights = _random_weights(1, 1, h, w, seed)
    out_t, g_t = _grads("torch", args, cams, weights, sh_basis=sh_basis)
    out_d, g_d = _grads("dense", args, cams, weights, sh_basis=sh_basis)
    # The scene must actually cover the image, or the comparison is vacuous.
    alpha = out_d.alpha.detach()
    assert float(alpha.max()) > 0.5 and float((alpha > 1e-3).double().mean()) > 0.3
    for name in ("color", "depth", "alpha"):
        torch.testing.assert_close(getattr(out_t, name), getattr(out_d, name), rtol=0, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(("means", "covariances", "harmonics", "opacities"), g_t, g_d):
        assert float(b.abs().max()) > 0, name
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_sh_degree_argument_truncates_evaluation():
    """``sh_degree=1`` on degree-3 harmonics equals rendering only the first 4 coefficients."""
    scene = make_scene(30, 10, 1, seed=7, sh_degree=3, dtype=F64)
    means, cov, harm, opac = _scene_args(scene)
    full = render(means, cov, harm, opac, *_cams(scene), sh_degree=1)
    cut = render(means, cov, harm[..., :4].contiguous(), opac, *_cams(scene))
    dense = render(means, cov, harm, opac, *_cams(scene), sh_degree=1, backend="dense")
    torch.testing.assert_close(full.color, cut.color, rtol=0, atol=1e-12)
    torch.testing.assert_close(full.color, dense.color, rtol=0, atol=1e-6)
    assert float((render(means, cov, harm, opac, *_cams(scene)).color - full.color).abs().max()) > 1e-4


@pytest.mark.parametrize("sh_basis", ["e3nn", "3dgs"])
def test_batched_multiview_with_background_matches_dense(sh_basis):
    scene = make_scene(40, 10, 3, seed=11, batch=2, sh_degree=2, dtype=F64)
    args, cams = _scene_args(scene), _cams(scene)
    h, w = scene.image_shape
    gen = torch.Generator().manual_seed(5)
    bg = torch.rand(2, 3, 3, generator=gen, dtype=F64)
    weights = _random_weights(2, 3, h, w, 3)
    out_t, g_t = _grads("torch", args, cams, weights, bg=bg, sh_basis=sh_basis)
    out_d, g_d = _grads("dense", args, cams, weights, bg=bg, sh_basis=sh_basis)
    assert out_t.color.shape == (2, 3, 3, h, w)
    assert out_t.depth.shape == out_t.alpha.shape == (2, 3, h, w)
    for name in ("color", "depth", "alpha"):
        torch.testing.assert_close(getattr(out_t, name), getattr(out_d, name), rtol=0, atol=1e-6)
    for a, b in zip(g_t, g_d):
        assert _rel(a, b) < 1e-5
    # Batch elements and views are independent: rendering element 1 / view 2 alone agrees.
    ext, k, near, far, shape = cams
    single = render(*(a[1:2] for a in args), ext[1:2, 2:3], k[1:2, 2:3], near[1:2, 2:3],
                    far[1:2, 2:3], shape, bg[1:2, 2:3], sh_basis=sh_basis)
    torch.testing.assert_close(single.color[0, 0], out_t.color[1, 2], rtol=0, atol=1e-12)
    # The background enters as (1 - alpha) * bg.
    no_bg = render(*args, *cams, sh_basis=sh_basis)
    expect = no_bg.color + (1 - no_bg.alpha)[:, :, None] * bg[..., None, None]
    torch.testing.assert_close(out_t.color, expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_scene_per_view_near_matches_dense(seed):
    """Gaussians far outside the frustum (Jacobian clamp), close to the near-culling plane and
    behind the cameras, with a different near plane per (batch, view)."""
    gen = torch.Generator().manual_seed(seed)
    p = random_params(2, 60, sh_degree=2, generator=gen, dtype=F64, center=(0.0, 0.0, 2.0),
                      spread=2.0, scale_range=(0.05, 0.4))
    ext, k, _, far = make_cameras(2, batch=2, dtype=F64, focal=0.7)
    near = 0.3 + 0.8 * torch.rand(2, 2, generator=gen, dtype=F64)
    args = (p.means, p.covariances(), p.harmonics, p.opacities())
    h, w = 10, 14  # not square
    cams = (ext, k, near, far, (h, w))
    proj = project(*args, ext, k, near, (h, w), "e3nn")
    assert 0 < int((~proj.valid).sum())  # some are culled
    u = (proj.mean2d[:, 0] - (w - 1) / 2) / (0.7 * w)
    assert bool(((u.abs() > 1.3 * 0.5 / 0.7) & proj.valid).any())  # some hit the clamp
    weights = _random_weights(2, 2, h, w, seed)
    out_t, g_t = _grads("torch", args, cams, weights)
    out_d, g_d = _grads("dense", args, cams, weights)
    torch.testing.assert_close(out_t.color, out_d.color, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_t.alpha, out_d.alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_t.depth, out_d.depth, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_t, g_d):
        assert _rel(a, b) < 1e-5


def test_float32_torch_backend_close_to_float64_reference():
    scene = make_scene(150, 16, 2, seed=8, sh_degree=3, dtype=F64)
    args, cams = _scene_args(scene), _cams(scene)
    ref = render(*args, *cams, backend="dense")
    out = render(*(a.float() for a in args), *(c.float() for c in cams[:4]), cams[4])
    assert out.color.dtype == out.depth.dtype == out.alpha.dtype == torch.float32
    torch.testing.assert_close(out.color.double(), ref.color, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.alpha.double(), ref.alpha, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.depth.double(), ref.depth, rtol=0, atol=1e-4)


def test_background_shapes_broadcast():
    scene = make_scene(20, 8, 2, seed=3, batch=2, dtype=F64)
    args, cams = _scene_args(scene), _cams(scene)
    c = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    ref = render(*args, *cams, c.expand(2, 2, 3))
    for bg in (c, c.expand(2, 3)):
        torch.testing.assert_close(render(*args, *cams, bg).color, ref.color, rtol=0, atol=0)
    with pytest.raises(ShapeError, match="background"):
        render(*args, *cams, torch.zeros(4, dtype=F64))


# ---------------------------------------------------------------------- derivatives


def _tiny_scene():
    """6 Gaussians in front of a 6x6 camera, moderate opacities, no thresholds near a kink."""
    gen = torch.Generator().manual_seed(42)
    g = 6
    uv = 0.15 + 0.7 * torch.rand(g, 2, generator=gen, dtype=F64)
    depth = 2.0 + 2.0 * torch.rand(g, generator=gen, dtype=F64)
    means = torch.stack([(uv[:, 0] - 0.5) * depth, (uv[:, 1] - 0.5) * depth, depth], -1)[None]
    log_scales = torch.log(0.08 + 0.12 * torch.rand(1, g, 3, generator=gen, dtype=F64))
    quats = torch.randn(1, g, 4, generator=gen, dtype=F64)
    harm = 0.5 * torch.randn(1, g, 3, 4, generator=gen, dtype=F64)
    opac = 0.3 + 0.4 * torch.rand(1, g, generator=gen, dtype=F64)
    return means, log_scales, quats, harm, opac


def test_gradcheck_tiny_scene():
    """gradcheck w.r.t. means, log-scales, quaternions (covariance through the symmetric
    ``build_covariance``), the DC harmonics and opacities. The degree-1 coefficients are held
    fixed (they enter linearly; keeping them makes the colour depend on the means)."""
    means, log_scales, quats, harm, opac = _tiny_scene()
    sh_rest = harm[..., 1:]
    ext, k, near, far, shape = _single_camera(size=6)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=F64)

    def fn(m, ls, q, dc, o):
        out = render(m, build_covariance(ls, q), torch.cat([dc, sh_rest], -1), o, ext, k, near,
                     far, shape, bg, sh_basis="3dgs", validate=False)
        return out.color, out.depth, out.alpha

    out = fn(means, log_scales, quats, harm[..., :1], opac)
    assert float(out[2].max()) > 0.3  # something is on screen
    inputs = tuple(t.clone().requires_grad_(True)
                   for t in (means, log_scales, quats, harm[..., :1], opac))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_forward_mode_jvp_matches_finite_differences():
    scene = make_scene(25, 8, 2, seed=5, sh_degree=1, dtype=F64, num_pose_views=1)
    params = scene.params
    layout = params.layout
    x0 = params.flatten()
    gen = torch.Generator().manual_seed(9)
    tangent = torch.randn(x0.shape, generator=gen, dtype=F64)
    tangent = tangent / tangent.norm()

    def f(x):
        out = render_params(GaussianParams.unflatten(x, layout), scene.extrinsics, scene.intrinsics,
                            scene.near, scene.far, scene.image_shape, sh_basis="e3nn")
        return torch.cat([out.color.flatten(), out.depth.flatten(), out.alpha.flatten()])

    y0, jvp = torch.func.jvp(f, (x0,), (tangent,))
    torch.testing.assert_close(y0, f(x0), rtol=0, atol=1e-12)
    h = 1e-6
    fd = (f(x0 + h * tangent) - f(x0 - h * tangent)) / (2 * h)
    assert float(jvp.norm()) > 1e-3
    assert _rel(jvp, fd) < 1e-5, _rel(jvp, fd)
    # Forward and reverse mode agree: <J t, w> = <t, J^T w>.
    w = torch.randn(y0.shape, generator=gen, dtype=F64)
    x = x0.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad((f(x) * w).sum(), x)
    assert abs(float((jvp * w).sum() - (vjp * tangent).sum())) < 1e-8 * float(vjp.norm())


# ---------------------------------------------------------------- projection conventions


def test_centred_gaussian_peaks_at_centre_pixel():
    ext, k, near, far, shape = _single_camera(size=9)
    out = render(*_gaussians([[0.0, 0.0, 3.0]], scale=0.005), ext, k, near, far, shape)
    alpha = out.alpha[0, 0]
    assert divmod(int(alpha.argmax()), 9) == (4, 4)  # (row, col)
    # Symmetric about the centre pixel.
    torch.testing.assert_close(alpha, alpha.flip(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha, alpha.flip(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha, alpha.T, rtol=0, atol=1e-12)
    # A 0.005 world-unit Gaussian at z=3 has sigma^2 = (9 * 0.005 / 3)^2 + 0.3 px^2, peak o.
    sigma2 = (9 * 0.005 / 3) ** 2 + 0.3
    assert abs(float(alpha[4, 4]) - 0.9) < 1e-12
    assert abs(float(alpha[4, 5]) - 0.9 * math.exp(-0.5 / sigma2)) < 1e-12


@pytest.mark.parametrize("shift", [(1, 0), (0, 1), (-1, 0), (0, -1), (2, 3)])
def test_one_pixel_shift_per_x_over_z_of_one_over_width(shift):
    """fx = 1 (normalized), W = 9: X/Z = 1/W moves the projection by one pixel; +x is right
    and +y is down in the image (OpenCV)."""
    ext, k, near, far, shape = _single_camera(size=9)
    z = 3.0
    sx, sy = shift
    out = render(*_gaussians([[sx * z / 9, sy * z / 9, z]], scale=0.005), ext, k, near, far, shape)
    alpha = out.alpha[0, 0]
    row, col = divmod(int(alpha.argmax()), 9)
    assert (col, row) == (4 + sx, 4 + sy)
    # Exactly centred on the pixel: peak value is the opacity, neighbours symmetric.
    assert abs(float(alpha[row, col]) - 0.9) < 1e-12
    assert abs(float(alpha[row, col - 1] - alpha[row, col + 1])) < 1e-12
    assert abs(float(alpha[row - 1, col] - alpha[row + 1, col])) < 1e-12


def test_projected_mean_uses_fov_only_focal():
    """Non-square focal (fx != fy): the projected mean is f_px * X/Z + (W-1)/2 with
    f_px = W / (2 tan(fov/2)) = fx * W for a centred principal point."""
    ext, k, near, far, _ = _single_camera(fx=0.8, fy=1.2)
    shape = (10, 12)  # h, w
    means, cov, harm, opac = _gaussians([[0.3, -0.2, 2.5]], scale=0.02)
    proj = project(means, cov, harm, opac, ext, k, near, shape, "e3nn")
    expect = torch.tensor([0.8 * 12 * 0.3 / 2.5 + 5.5, 1.2 * 10 * -0.2 / 2.5 + 4.5], dtype=F64)
    torch.testing.assert_close(proj.mean2d[0], expect, rtol=0, atol=1e-12)
    assert float(proj.depth[0]) == pytest.approx(2.5, abs=1e-12)


@pytest.mark.parametrize("sh_basis", ["e3nn", "3dgs"])
def test_constant_dc_colour(sh_basis):
    ext, k, near, far, shape = _single_camera(size=9)
    dc = torch.tensor([[0.7, -0.4, -3.0]], dtype=F64)  # the last one clamps to 0
    means, cov, harm, opac = _gaussians([[0.0, 0.0, 3.0]], scale=0.5, opacity=0.8, dc=dc)
    out = render(means, cov, harm, opac, ext, k, near, far, shape, sh_basis=sh_basis)
    expect = (C0 * dc[0] + 0.5).clamp_min(0)
    assert float(expect[2]) == 0.0
    alpha = out.alpha[0, 0]
    mask = alpha > 0
    assert int(mask.sum()) > 9
    colour = out.color[0, 0][:, mask] / alpha[mask]  # black background
    torch.testing.assert_close(colour, expect[:, None].expand_as(colour), rtol=0, atol=1e-12)


def test_sh_bases_are_permutations_of_each_other():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(50, 3, generator=gen, dtype=F64)
    d = d / d.norm(dim=-1, keepdim=True)
    permuted = torch.stack([d[:, 2], d[:, 0], d[:, 1]], -1)  # (x, y, z) = (dz, dx, dy)
    for degree in range(4):
        torch.testing.assert_close(sh_basis_values(d, degree, "e3nn"),
                                   sh_basis_values(permuted, degree, "3dgs"), rtol=0, atol=1e-15)
    # Degree 1 of the 3dgs basis is C0, -C1 y, C1 z, -C1 x (graphdeco's convention).
    e = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(sh_basis_values(e, 1, "3dgs"), torch.tensor(
        [[C0, 0, C1, 0], [C0, 0, 0, -C1], [C0, -C1, 0, 0]], dtype=F64), rtol=0, atol=1e-15)
    # e3nn at the +z direction is the 3dgs basis at +x (permuted): [C0, 0, 0, -C1].
    torch.testing.assert_close(sh_basis_values(e[:1], 1, "e3nn"),
                               torch.tensor([[C0, 0, 0, -C1]], dtype=F64), rtol=0, atol=1e-15)


def test_sh_basis_is_orthonormal_on_the_sphere():
    """Independent check of the degree <= 3 constants: the real SH basis is orthonormal."""
    n = 40000
    i = torch.arange(n, dtype=F64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5 ** 0.5) * i
    r = (1 - z * z).sqrt()
    dirs = torch.stack([r * phi.cos(), r * phi.sin(), z], -1)  # Fibonacci sphere
    y = sh_basis_values(dirs, 3, "3dgs")
    gram = y.T @ y * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(16, dtype=F64), rtol=0, atol=2e-3)


@pytest.mark.parametrize("near", [1.0, 2.5])
def test_near_culling_at_one_fifth_of_near(near):
    ext, k, _, far, shape = _single_camera(size=9)
    near_t = torch.full((1, 1), near, dtype=F64)
    z_cull = 0.2 * near
    culled = render(*_gaussians([[0.0, 0.0, z_cull]], scale=0.001), ext, k, near_t, far, shape)
    assert float(culled.alpha.abs().max()) == 0.0
    kept = render(*_gaussians([[0.0, 0.0, z_cull * 1.01]], scale=0.001), ext, k, near_t, far, shape)
    assert float(kept.alpha[0, 0, 4, 4]) == pytest.approx(0.9, abs=1e-12)
    # No far culling upstream: a Gaussian beyond `far` still renders.
    beyond = render(*_gaussians([[0.0, 0.0, 150.0]], scale=0.1), ext, k, near_t, far, shape)
    assert float(beyond.alpha[0, 0, 4, 4]) == pytest.approx(0.9, abs=1e-12)


def test_single_gaussian_alpha_clamped_to_099():
    ext, k, near, far, shape = _single_camera(size=9)
    out = render(*_gaussians([[0.0, 0.0, 2.0]], scale=0.3, opacity=1.0), ext, k, near, far, shape)
    assert float(out.alpha.max()) == pytest.approx(0.99, abs=1e-15)
    assert float(out.alpha.max()) <= 0.99
    dense = render(*_gaussians([[0.0, 0.0, 2.0]], scale=0.3, opacity=1.0), ext, k, near, far, shape,
                   backend="dense")
    assert float(dense.alpha.max()) <= 0.99


def test_compositing_two_stacked_gaussians():
    """C = a1 c1 + (1 - a1) a2 c2 + (1 - a1)(1 - a2) bg at the pixel both are centred on; the
    front Gaussian is listed second so sorting by depth matters."""
    ext, k, near, far, shape = _single_camera(size=9)
    o_front, o_back = 0.8, 0.7
    c_front = torch.tensor([0.9, 0.1, 0.3], dtype=F64)
    c_back = torch.tensor([0.2, 0.8, 0.6], dtype=F64)
    bg = torch.tensor([0.05, 0.4, 1.0], dtype=F64)
    z_front, z_back = 2.0, 5.0
    dc = torch.stack([(c_back - 0.5) / C0, (c_front - 0.5) / C0])
    means, cov, harm, _ = _gaussians([[0.0, 0.0, z_back], [0.0, 0.0, z_front]], scale=0.01, dc=dc)
    opac = torch.tensor([[o_back, o_front]], dtype=F64)
    for backend in ("torch", "dense"):
        out = render(means, cov, harm, opac, ext, k, near, far, shape, bg, backend=backend)
        a1, a2 = o_front, o_back
        expect_c = a1 * c_front + (1 - a1) * a2 * c_back + (1 - a1) * (1 - a2) * bg
        torch.testing.assert_close(out.color[0, 0, :, 4, 4], expect_c, rtol=0, atol=1e-12)
        assert float(out.alpha[0, 0, 4, 4]) == pytest.approx(a1 + (1 - a1) * a2, abs=1e-12)
        assert float(out.depth[0, 0, 4, 4]) == pytest.approx(a1 * z_front + (1 - a1) * a2 * z_back,
                                                             abs=1e-12)


def test_transmittance_early_stop():
    """Compositing stops before the Gaussian that would take T below 1e-4."""
    ext, k, near, far, shape = _single_camera(size=9)
    dc = torch.stack([torch.full((3,), 1.0), torch.full((3,), 2.0), torch.full((3,), 3.0)]).to(F64)
    means, cov, harm, _ = _gaussians([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0]],
                                     scale=0.01, dc=dc)
    # alphas 0.99, 0.98, 0.99: T after two = 2e-4 >= 1e-4 (kept), after three 2e-6 (stopped).
    opac = torch.tensor([[0.99, 0.98, 0.99]], dtype=F64)
    cols = (C0 * dc[:, 0] + 0.5).tolist()
    for backend in ("torch", "dense"):
        out = render(means, cov, harm, opac, ext, k, near, far, shape, backend=backend)
        w1, w2 = 0.99, 0.01 * 0.98
        assert float(out.alpha[0, 0, 4, 4]) == pytest.approx(w1 + w2, abs=1e-12)
        assert float(out.color[0, 0, 0, 4, 4]) == pytest.approx(w1 * cols[0] + w2 * cols[1], abs=1e-12)
        assert float(out.depth[0, 0, 4, 4]) == pytest.approx(w1 * 2.0 + w2 * 3.0, abs=1e-12)


def test_gaussian_behind_the_early_stop_gets_exactly_zero_gradient():
    """Pairs past the early stop are planned but composite nothing: their Gaussian's gradient is
    exactly zero (not rounding noise of the global cumulative sum, which Adam would amplify)."""
    ext, k, near, far, shape = _single_camera(size=15)
    dc = torch.tensor([[0.3] * 3, [-0.2] * 3, [0.1] * 3, [0.5] * 3], dtype=F64)
    means, cov, harm, _ = _gaussians([[0.0, 0.0, 2.0], [0.05, 0.0, 2.5], [0.0, -0.05, 3.0], [0.0, 0.02, 4.0]],
                                     scale=2.0, dc=dc)
    cov[0, 3] *= 1e-4  # the back Gaussian is small: all its pixels lie behind the three in front
    opac = torch.tensor([[0.995, 0.995, 0.995, 0.9]], dtype=F64)
    args = [t.clone().requires_grad_(True) for t in (means, cov, harm, opac)]
    proj = project(args[0], args[1], args[2], args[3], ext, k, near, shape, "e3nn")
    plan = build_plan(proj, shape)
    assert int((plan.gaussian == 3).sum()) > 0  # it is planned ...
    out = render(*args, ext, k, near, far, shape)
    loss = _weighted_loss(out, _random_weights(1, 1, *shape, seed=3))
    grads = torch.autograd.grad(loss, args)
    for g in grads:
        assert torch.equal(g[0, 3], torch.zeros_like(g[0, 3]))  # ... but hidden: exactly zero
        assert float(g[0, :3].abs().max()) > 0


def test_faint_gaussian_below_alpha_threshold_is_skipped():
    ext, k, near, far, shape = _single_camera(size=9)
    faint = render(*_gaussians([[0.0, 0.0, 3.0]], opacity=0.99 / 255), ext, k, near, far, shape)
    assert float(faint.alpha.abs().max()) == 0.0
    visible = render(*_gaussians([[0.0, 0.0, 3.0]], opacity=1.01 / 255), ext, k, near, far, shape)
    assert float(visible.alpha[0, 0, 4, 4]) == pytest.approx(1.01 / 255, abs=1e-15)


# ------------------------------------------------------------------------------ culling


def test_per_gaussian_culling_plan_is_sparse():
    scene = make_scene(2000, 32, 2)
    p = scene.params
    proj = project(p.means, p.covariances(), p.harmonics, p.opacities(), scene.extrinsics,
                   scene.intrinsics, scene.near, (32, 32), "e3nn")
    plan = build_plan(proj, (32, 32))
    dense_pairs = 2000 * 32 * 32 * 2
    assert 0 < plan.num_pairs < 0.05 * dense_pairs, plan.num_pairs
    # Pairs are sorted by pixel and reference valid indices.
    assert bool((plan.pixel[1:] >= plan.pixel[:-1]).all())
    assert int(plan.pixel.max()) < plan.num_pixels == 2 * 32 * 32
    assert int(plan.gaussian.max()) < 2 * 2000


# --------------------------------------------------------------------------- bad input


def _valid_inputs():
    scene = make_scene(5, 8, 1, seed=1, dtype=F64)
    return list(_scene_args(scene)) + [scene.extrinsics, scene.intrinsics, scene.near, scene.far]


NAMES = ["means", "covariances", "harmonics", "opacities", "extrinsics", "intrinsics", "near", "far"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("index", range(8))
def test_non_finite_inputs_raise(index, bad):
    inputs = _valid_inputs()
    t = inputs[index].clone()
    t.reshape(-1)[0] = bad
    inputs[index] = t
    with pytest.raises(NonFiniteError, match=NAMES[index]):
        render(*inputs, (8, 8))


@pytest.mark.parametrize("index,shape", [
    (0, (1, 5, 2)), (1, (1, 5, 3)), (2, (1, 5, 3, 3)), (2, (1, 4, 3, 1)), (3, (1, 5, 1)),
    (4, (1, 1, 3, 4)), (5, (1, 1, 4, 4)), (6, (1,)), (7, (1, 2)),
])
@pytest.mark.user_errors
def test_wrong_shapes_raise(index, shape):
    inputs = _valid_inputs()
    inputs[index] = torch.ones(shape, dtype=F64)
    with pytest.raises(ShapeError):
        render(*inputs, (8, 8))


@pytest.mark.user_errors
@pytest.mark.parametrize("index", range(8))
def test_integer_dtypes_raise(index):
    inputs = _valid_inputs()
    inputs[index] = inputs[index].round().long()
    with pytest.raises(DTypeError, match="float"):
        render(*inputs, (8, 8))


def test_mixed_float_dtypes_raise():
    inputs = _valid_inputs()
    inputs[2] = inputs[2].float()
    with pytest.raises(DTypeError, match="dtype"):
        render(*inputs, (8, 8))


def test_non_psd_covariance_raises():
    inputs = _valid_inputs()
    cov = inputs[1].clone()
    cov[0, 2] = torch.diag(torch.tensor([0.01, -0.002, 0.01], dtype=F64))
    inputs[1] = cov
    with pytest.raises(InvalidCovarianceError, match="positive definite"):
        render(*inputs, (8, 8))
    cov = inputs[1].clone()
    cov[0, 2] = torch.tensor([[0.01, 0.005, 0], [-0.005, 0.01, 0], [0, 0, 0.01]], dtype=F64)
    inputs[1] = cov  # not symmetric
    with pytest.raises(InvalidCovarianceError):
        render(*inputs, (8, 8))


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0)])
def test_zero_sized_image_raises(shape):
    with pytest.raises(ShapeError, match="image_shape"):
        render(*_valid_inputs(), shape)


@pytest.mark.parametrize("value", [-0.1, 1.2])
def test_opacities_outside_unit_interval_raise(value):
    inputs = _valid_inputs()
    inputs[3] = inputs[3].clone()
    inputs[3][0, 1] = value
    with pytest.raises(Diff3RError, match="opacities"):
        render(*inputs, (8, 8))


def test_pixel_unit_intrinsics_raise():
    inputs = _valid_inputs()
    k = inputs[5].clone()
    k[..., 0, :] *= 8
    k[..., 1, :] *= 8  # cx = cy = 4 (pixels) instead of 0.5
    k[..., 0, 2] = 320.0
    k[..., 1, 2] = 240.0
    inputs[5] = k
    with pytest.raises(CameraConventionError, match="normalized"):
        render(*inputs, (8, 8))


def test_reflected_c2w_raises():
    inputs = _valid_inputs()
    inputs[4] = inputs[4] @ torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=F64))
    assert float(torch.linalg.det(inputs[4][0, 0, :3, :3])) == pytest.approx(-1.0)
    with pytest.raises(CameraConventionError, match="reflection"):
        render(*inputs, (8, 8))


@pytest.mark.user_errors
def test_unknown_backend_raises():
    with pytest.raises(Diff3RError, match="backend"):
        render(*_valid_inputs(), (8, 8), backend="optix")


# ------------------------------------------------------------------------ edge results


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_empty_scene_renders_background(backend):
    ext, k, near, far, shape = _single_camera(size=7)
    ext, k, near, far = (t.expand(2, 2, *t.shape[2:]).clone() for t in (ext, k, near, far))
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]], dtype=F64)
    means = torch.zeros(2, 0, 3, dtype=F64, requires_grad=True)
    out = render(means, torch.zeros(2, 0, 3, 3, dtype=F64), torch.zeros(2, 0, 3, 4, dtype=F64),
                 torch.zeros(2, 0, dtype=F64), ext, k, near, far, shape, bg, backend=backend)
    assert out.color.shape == (2, 2, 3, 7, 7)
    assert torch.equal(out.color, bg[:, None, :, None, None].expand(2, 2, 3, 7, 7))
    assert torch.equal(out.alpha, torch.zeros(2, 2, 7, 7, dtype=F64))
    assert torch.equal(out.depth, torch.zeros(2, 2, 7, 7, dtype=F64))


def test_everything_behind_camera_renders_background_and_stays_finite():
    ext, k, near, far, shape = _single_camera(size=9)
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    pos = [[0.0, 0.0, -3.0], [0.5, -0.2, -0.5], [0.0, 0.0, 0.0], [0.01, 0.0, 0.1]]
    args = [t.clone().requires_grad_(True) for t in _gaussians(pos, scale=0.2, opacity=0.9)]
    for backend in ("torch", "dense"):
        out = render(*args, ext, k, near, far, shape, bg, backend=backend)
        assert torch.equal(out.color[0, 0].detach(), bg[:, None, None].expand(3, 9, 9))
        assert float(out.alpha.detach().abs().max()) == 0.0
    out = render(*args, ext, k, near, far, shape, bg)
    grads = torch.autograd.grad(out.color.sum() + out.depth.sum(), args, allow_unused=True)
    for g in grads:
        assert g is None or bool(torch.isfinite(g).all())


def test_outputs_and_gradients_finite_for_awkward_scene():
    """Huge, tiny, off-screen, grazing-angle and camera-centre Gaussians: no NaN anywhere."""
    ext, k, near, far, shape = _single_camera(size=8)
    means = torch.tensor([[[0.0, 0.0, 2.0], [50.0, 0.0, 1.0], [0.0, 0.0, 0.21], [0.0, 0.0, 1e4],
                           [0.1, 0.1, 0.3], [-3.0, 2.0, 0.5]]], dtype=F64)
    scales = torch.tensor([1e-6, 5.0, 0.3, 100.0, 1e-3, 2.0], dtype=F64)
    cov = scales[None, :, None, None] ** 2 * torch.eye(3, dtype=F64)
    cov[0, 1] = torch.diag(torch.tensor([1.0, 1e-8, 1e-8], dtype=F64))
    harm = torch.randn(1, 6, 3, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    opac = torch.tensor([[1.0, 0.5, 0.99, 1.0, 0.004, 0.7]], dtype=F64)
    args = [t.clone().requires_grad_(True) for t in (means, cov, harm, opac)]
    out = render(*args, ext, k, near, far, shape, sh_basis="3dgs")
    for t in (out.color, out.depth, out.alpha):
        assert bool(torch.isfinite(t).all())
    assert float(out.alpha.detach().max()) > 0
    grads = torch.autograd.grad(out.color.sum() + out.depth.sum() + out.alpha.sum(), args)
    for g in grads:
        assert bool(torch.isfinite(g).all())


# --------------------------------------------------------------------------------- gsplat


def test_gsplat_backend_unavailable_on_cpu_tensors():
    """Without CUDA (or with CPU tensors) the gsplat backend raises a clear typed error."""
    with pytest.raises(BackendUnavailableError, match="CUDA") as info:
        render(*_valid_inputs(), (8, 8), backend="gsplat")
    assert isinstance(info.value, RuntimeError)  # also catchable as RuntimeError


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat parity needs a CUDA device")
@pytest.mark.parametrize("sh_basis", ["e3nn", "3dgs"])
def test_gsplat_matches_torch_backend(sh_basis):
    pytest.importorskip("gsplat")
    scene = make_scene(300, 24, 2, seed=4, batch=2, sh_degree=3, dtype=torch.float32)
    dev = torch.device("cuda")
    args = [a.to(dev) for a in _scene_args(scene)]
    ext, k, near, far, shape = _cams(scene)
    cams = [t.to(dev) for t in (ext, k, near, far)] + [shape]
    bg = torch.tensor([0.2, 0.3, 0.4], device=dev)
    ref = render(*args, *cams, bg, sh_basis=sh_basis, backend="torch")
    out = render(*args, *cams, bg, sh_basis=sh_basis, backend="gsplat")
    assert out.color.shape == ref.color.shape
    assert float((out.color - ref.color).abs().max()) < 1e-3
    assert float((out.alpha - ref.alpha).abs().max()) < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat conventions need a CUDA device")
def test_gsplat_alpha_clamp_and_compositing_follow_upstream():
    """Upstream (graphdeco) clamps alpha at 0.99. POSSIBLE BUG (not run on this CPU machine):
    gsplat 1.5.3's kernels clamp at 0.999 (RasterizeToPixels3DGSFwd.cu: ``min(0.999f, ...)``)
    and ``gsplat_backend.render_gsplat`` does not compensate, so an opaque Gaussian renders
    alpha 0.999 instead of 0.99 there."""
    pytest.importorskip("gsplat")
    dev = torch.device("cuda")
    ext, k, near, far, shape = (t.float().to(dev) if torch.is_tensor(t) else t
                                for t in _single_camera(size=9))
    one = [t.float().to(dev) for t in _gaussians([[0.0, 0.0, 2.0]], scale=0.3, opacity=1.0)]
    out = render(*one, ext, k, near, far, shape, backend="gsplat")
    assert float(out.alpha.max()) == pytest.approx(0.99, abs=1e-5)
    c_front = torch.tensor([0.9, 0.1, 0.3])
    c_back = torch.tensor([0.2, 0.8, 0.6])
    bg = torch.tensor([0.05, 0.4, 1.0])
    dc = torch.stack([(c_back - 0.5) / C0, (c_front - 0.5) / C0])
    means, cov, harm, _ = _gaussians([[0.0, 0.0, 5.0], [0.0, 0.0, 2.0]], scale=0.01, dc=dc,
                                     dtype=torch.float32)
    opac = torch.tensor([[0.7, 0.8]])
    out = render(*(t.to(dev) for t in (means, cov, harm, opac)), ext, k, near, far, shape,
                 bg.to(dev), backend="gsplat")
    expect = 0.8 * c_front + 0.2 * 0.7 * c_back + 0.2 * 0.3 * bg
    torch.testing.assert_close(out.color[0, 0, :, 4, 4].cpu(), expect, rtol=0, atol=1e-4)
