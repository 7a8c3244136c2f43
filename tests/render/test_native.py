"""The compiled CPU kernels of the torch backend (plan, composite and its derivative) against
the pure-PyTorch path and the dense reference: the same plan, the same renders and gradients, and
forward mode / second derivatives through the fallback."""

import subprocess
import sys

import pytest
import torch

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.render import build_plan, native, project, render

F64 = torch.float64

status = native.native_status()
pytestmark = pytest.mark.skipif(not status["available"],
                                reason=f"compiled renderer kernels unavailable: {status['reason']}")


@pytest.fixture
def pure_torch(monkeypatch):
    """Run the renderer without the compiled kernels."""
    def disable():
        monkeypatch.setattr(native, "usable", lambda *tensors: None)
    return disable


def _inputs(scene):
    p = scene.params
    return [p.means.detach(), p.covariances().detach(), p.harmonics.detach(), p.opacities().detach()]


def _cams(scene):
    return (scene.extrinsics, scene.intrinsics, scene.near, scene.far, scene.image_shape)


def _loss_and_grads(scene, weights, backend="torch"):
    xs = [t.clone().requires_grad_(True) for t in _inputs(scene)]
    out = render(*xs, *_cams(scene), backend=backend)
    loss = (out.color * weights).sum() + 0.3 * out.depth.sum() + 0.7 * out.alpha.sum()
    return out, torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_plan_is_the_pure_torch_plan(dtype, pure_torch):
    scene = make_scene(700, 24, 3, seed=4, batch=2, dtype=dtype)
    p = scene.params
    proj = project(p.means, p.covariances(), p.harmonics, p.opacities(), scene.extrinsics,
                   scene.intrinsics, scene.near, scene.image_shape, "e3nn")
    fast = build_plan(proj, scene.image_shape)
    pure_torch()
    ref = build_plan(proj, scene.image_shape)
    assert fast.num_pairs > 5000
    for name in ("gaussian", "pixel", "seg_start", "px", "py"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (F64, 1e-12)])
def test_compiled_projection_values_are_the_pure_torch_projection(dtype, tol, pure_torch):
    """Values only (no graph), the projection's geometry is one compiled pass; it gives the
    PyTorch path's numbers, for Gaussians behind the cameras and far outside the clamped field of
    view too, and the same culling. With a graph wanted, the PyTorch path runs."""
    scene = make_scene(500, 20, 3, seed=6, batch=2, sh_degree=1, dtype=dtype)
    p = scene.params
    means = p.means.detach().clone()
    means[:, :20] = means[:, :20] * torch.tensor([1.0, 1.0, -2.0], dtype=dtype)  # behind
    means[:, 20:40, 0] += 30.0  # outside the field of view
    args = (means, p.covariances().detach(), p.harmonics.detach(), p.opacities().detach(),
            scene.extrinsics, scene.intrinsics, scene.near, scene.image_shape, "e3nn")
    calls = []
    real = native.usable_values
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "usable_values", lambda *t: calls.append(1) or real(*t))
        fast = project(*args)
        assert calls and real(*args[:7]) is not None
        with torch.enable_grad():
            graph = project(args[0].clone().requires_grad_(True), *args[1:])
    pure_torch()
    ref = project(*args)
    assert graph.mean2d.requires_grad
    assert torch.equal(fast.valid, ref.valid) and 0 < int(ref.valid.sum()) < ref.valid.numel()
    for name in ("mean2d", "conic", "cov2d", "depth", "color", "opacity"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        ok = ref.valid if name == "conic" else torch.ones_like(ref.valid)
        scale = float(b[ok].abs().max())
        assert float((a[ok] - b[ok]).abs().max()) <= tol * scale, name
        assert torch.allclose(getattr(graph, name).detach(), b, rtol=tol, atol=tol * scale), name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (F64, 1e-10)])
def test_render_and_gradients_match_the_pure_torch_path(dtype, tol, pure_torch):
    scene = make_scene(900, 24, 2, seed=6, sh_degree=1, dtype=dtype)
    weights = torch.rand(1, 2, 3, 24, 24, generator=torch.Generator().manual_seed(0), dtype=dtype)
    out_n, grads_n = _loss_and_grads(scene, weights)
    pure_torch()
    out_t, grads_t = _loss_and_grads(scene, weights)
    for name in ("color", "depth", "alpha"):
        a, b = getattr(out_n, name), getattr(out_t, name)
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), name
    for a, b in zip(grads_n, grads_t):
        assert float((a - b).norm() / b.norm()) <= 10 * tol


def test_render_and_gradients_match_the_dense_reference(pure_torch):
    """As close to the dense reference as the pure-PyTorch path (within the contract's 1e-6)."""
    scene = make_scene(300, 16, 2, seed=2, sh_degree=1, dtype=F64)
    weights = torch.rand(1, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    out_d, grads_d = _loss_and_grads(scene, weights, backend="dense")
    out_n, grads_n = _loss_and_grads(scene, weights)
    pure_torch()
    out_t, grads_t = _loss_and_grads(scene, weights)
    for name in ("color", "depth", "alpha"):
        err_n = float((getattr(out_n, name) - getattr(out_d, name)).abs().max())
        err_t = float((getattr(out_t, name) - getattr(out_d, name)).abs().max())
        assert err_n <= 1e-6 and err_n <= 1.01 * err_t + 1e-12, (name, err_n, err_t)
    for a, b, c in zip(grads_n, grads_t, grads_d):
        err_n, err_t = float((a - c).norm() / c.norm()), float((b - c).norm() / c.norm())
        assert err_n <= 1e-5 and err_n <= 1.01 * err_t + 1e-12, (err_n, err_t)


def test_compiled_derivative_passes_gradcheck():
    scene = make_scene(12, 8, 2, seed=3, dtype=F64)
    means, cov, harm, opac = _inputs(scene)
    cams = _cams(scene)

    def f(m, h, o):
        return render(m, cov, h, o, *cams, validate=False).color

    assert torch.autograd.gradcheck(f, (means.clone().requires_grad_(), harm.clone().requires_grad_(),
                                        opac.clone().requires_grad_()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_forward_mode_matches_reverse_mode():
    """``torch.func.jvp`` goes through the pure-PyTorch composite; it agrees with the compiled
    reverse mode: <w, J t> = <J^T w, t>."""
    scene = make_scene(200, 12, 2, seed=5, dtype=F64)
    xs = _inputs(scene)
    cams = _cams(scene)
    gen = torch.Generator().manual_seed(2)
    tangents = [1e-2 * torch.randn(t.shape, generator=gen, dtype=F64) for t in xs]
    tangents[1] = tangents[1] + tangents[1].transpose(-1, -2)
    weights = torch.rand(1, 2, 3, 12, 12, generator=gen, dtype=F64)
    _, jt = torch.func.jvp(lambda *a: render(*a, *cams).color, tuple(xs), tuple(tangents))
    leaves = [t.clone().requires_grad_(True) for t in xs]
    grads = torch.autograd.grad((render(*leaves, *cams).color * weights).sum(), leaves)
    lhs = float((weights * jt).sum())
    rhs = float(sum((g * t).sum() for g, t in zip(grads, tangents)))
    assert abs(lhs) > 1e-6
    assert lhs == pytest.approx(rhs, rel=1e-9)


def test_second_derivatives_match_the_pure_torch_path(pure_torch):
    """A backward with ``create_graph=True`` differentiates the pure-PyTorch composite: the
    Hessian-vector product is the pure path's."""
    scene = make_scene(150, 12, 2, seed=7, dtype=F64)
    theta = scene.params.flatten().detach()
    layout = scene.params.layout
    target = torch.rand(1, 2, 3, 12, 12, generator=torch.Generator().manual_seed(3), dtype=F64)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(4), dtype=F64)

    def hvp():
        from diff3r_plugin.gaussians.layout import GaussianParams
        from diff3r_plugin.render import render_params

        t = theta.clone().requires_grad_(True)
        p = GaussianParams.unflatten(t, layout)
        out = render_params(p, scene.extrinsics, scene.intrinsics, scene.near, scene.far,
                            scene.image_shape).color
        (g,) = torch.autograd.grad(0.5 * ((out - target) ** 2).sum(), t, create_graph=True)
        return g.detach(), torch.autograd.grad(g, t, v)[0]

    g_n, h_n = hvp()
    pure_torch()
    g_t, h_t = hvp()
    assert float(h_t.norm()) > 0
    assert float((g_n - g_t).norm() / g_t.norm()) < 1e-10
    assert float((h_n - h_t).norm() / h_t.norm()) < 1e-10


def test_empty_and_fully_culled_scenes_render_the_background():
    scene = make_scene(10, 8, 1, seed=1, dtype=F64)
    means, cov, harm, opac = _inputs(scene)
    behind = means.clone()
    behind[..., 2] = -behind[..., 2] - 100.0  # all behind the camera: no pairs
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=F64)
    m, o = behind.requires_grad_(True), opac.clone().requires_grad_(True)
    out = render(m, cov, harm, o, *_cams(scene), bg, validate=False)
    torch.testing.assert_close(out.color[0, 0], bg[:, None, None].expand(3, 8, 8), rtol=0, atol=0)
    out.color.sum().backward()
    assert torch.equal(o.grad, torch.zeros_like(o.grad))


def test_disabled_by_environment_variable():
    code = ("from diff3r_plugin.render import native; s = native.native_status(); "
            "assert not s['available'] and 'DIFF3R_NATIVE' in s['reason'], s")
    env = {**__import__("os").environ, "DIFF3R_NATIVE": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kernels_give_the_same_bits_with_any_thread_count(dtype):
    """The kernels split work into whole views (or whole pixels) and keep the serial order
    inside each piece (``csrc/parallel.h``): plan, composite and its derivative with one thread
    and with four are equal bit for bit, so their results do not depend on
    ``OMP_NUM_THREADS``. (PyTorch's own ops around them, the projection's matrix products among
    them, make no such promise.)"""
    scene = make_scene(3000, 32, 3, seed=8, batch=2, sh_degree=1, dtype=dtype)
    p = scene.params
    with torch.no_grad():
        proj = project(p.means, p.covariances(), p.harmonics, p.opacities(), scene.extrinsics,
                       scene.intrinsics, scene.near, scene.image_shape, "e3nn")
    attrs = torch.cat([proj.mean2d, proj.conic, proj.opacity[:, None], proj.color,
                       proj.depth[:, None]], 1).contiguous()
    mod = native.usable(attrs)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            plan = build_plan(proj, scene.image_shape)
            acc = mod.composite_forward(attrs, plan.gaussian, plan.pixel, plan.px, plan.py,
                                        plan.num_pixels)
            grad_out = torch.rand(acc.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
            grad = mod.composite_backward(attrs, plan.gaussian, plan.pixel, plan.px, plan.py, grad_out,
                                          32 * 32)
            runs.append((plan, acc, grad))
    finally:
        torch.set_num_threads(before)
    (plan1, acc1, grad1), (plan4, acc4, grad4) = runs
    assert plan1.num_pairs > 3 * (1 << 13)  # enough pairs for several parallel pieces
    for name in ("gaussian", "pixel", "seg_start", "px", "py"):
        assert torch.equal(getattr(plan1, name), getattr(plan4, name)), name
    assert float(acc1.abs().max()) > 0 and float(grad1.abs().max()) > 0
    assert torch.equal(acc1, acc4)
    assert torch.equal(grad1, grad4)
