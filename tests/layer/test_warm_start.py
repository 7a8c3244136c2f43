"""Warm-starting the implicit backward's PCG from an earlier solution."""

import pytest
import torch

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.errors import LayoutMismatchError, NonFiniteError
from diff3r_plugin.gaussians.layout import GROUPS, GaussianParams
from diff3r_plugin.layer import ContextViews, Diff3RLayer, diff3r_layer
from diff3r_plugin.render.api import render_params

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    s = make_scene(10, 8, 2, dtype=F64, seed=1)
    layout = s.params.layout
    theta0 = s.params.flatten()
    gen = torch.Generator().manual_seed(7)
    truth = GaussianParams.unflatten(theta0 + 0.05 * torch.randn(theta0.shape, generator=gen, dtype=F64), layout)
    images = render_params(truth, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images.clamp(0, 1), s.extrinsics, s.intrinsics, s.near, s.far)
    lam = layout.per_group({g: 0.5 for g in GROUPS}, dtype=F64)
    target = render_params(truth, s.extrinsics[:, :1], s.intrinsics[:, :1], s.near[:, :1], s.far[:, :1],
                           s.image_shape).color

    def outer(theta):
        p = GaussianParams.unflatten(theta, layout)
        pred = render_params(p, s.extrinsics[:, :1], s.intrinsics[:, :1], s.near[:, :1], s.far[:, :1],
                             s.image_shape).color
        return ((pred - target) ** 2).sum()

    return views, layout, theta0, lam, outer


def _grads(problem, config, warm_start=None):
    views, layout, theta0, lam, outer = problem
    t0 = theta0.clone().requires_grad_(True)
    lm = lam.clone().requires_grad_(True)
    theta_star, info = diff3r_layer(t0, lm, views, layout, config, warm_start=warm_start)
    outer(theta_star).backward()
    return t0.grad, lm.grad, info


def test_warm_start_from_the_previous_solution(problem):
    cfg = Diff3RConfig(steps=4, inner_solver="lm", pcg_tol=1e-6, pcg_maxiter=500)
    g_t, g_l, info = _grads(problem, cfg)
    assert not info.warm_started and int(info.pcg_iters[0]) > 0
    v = info.implicit_solution
    assert v is not None and v.shape == problem[2].shape
    v_copy = v.clone()
    g_t2, g_l2, info2 = _grads(problem, cfg, warm_start=v)
    assert info2.warm_started and info2.summary()["warm_started"]
    # The same scene and outer loss: the earlier solution already meets the tolerance.
    assert int(info2.pcg_iters[0]) == 0
    torch.testing.assert_close(g_t2, g_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_l2, g_l, rtol=1e-12, atol=0)
    assert torch.equal(v, v_copy)  # the warm start is not modified
    # A perturbed warm start still converges, to the same gradients within the tolerance.
    noisy = v + 0.3 * v.abs().mean() * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    g_t3, _, info3 = _grads(problem, cfg, warm_start=noisy)
    assert bool(info3.pcg_converged.all()) and int(info3.pcg_iters[0]) > 0
    rel = float((g_t3 - g_t).norm() / g_t.norm())
    assert rel < 1e-4, rel


def test_module_passes_the_warm_start(problem):
    views, layout, theta0, lam, outer = problem
    layer = Diff3RLayer(Diff3RConfig(steps=2, inner_solver="lm", pcg_tol=1e-6, pcg_maxiter=500))
    t0 = theta0.clone().requires_grad_(True)
    theta_star, info = layer(t0, lam, views, layout)
    outer(theta_star).backward()
    t1 = theta0.clone().requires_grad_(True)
    theta_star, info2 = layer(GaussianParams.unflatten(t1, layout), GaussianParams.unflatten(lam, layout), views,
                              warm_start=info.implicit_solution)
    outer(theta_star.flatten()).backward()
    assert info2.warm_started and int(info2.pcg_iters[0]) == 0


def test_bad_warm_start_is_refused(problem):
    views, layout, theta0, lam, _ = problem
    cfg = Diff3RConfig(steps=1, inner_solver="lm")
    with pytest.raises(LayoutMismatchError, match="warm_start"):
        diff3r_layer(theta0, lam, views, layout, cfg, warm_start=theta0[:, :-1])
    with pytest.raises(LayoutMismatchError, match="warm_start"):
        diff3r_layer(theta0, lam, views, layout, cfg, warm_start=torch.cat([theta0, theta0]))
    bad = torch.zeros_like(theta0)
    bad[0, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="warm_start"):
        diff3r_layer(theta0, lam, views, layout, cfg, warm_start=bad)
