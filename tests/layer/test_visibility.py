"""``visibility="frozen"``: the inner solve and its backward on the pair lists of theta0.

The energy with per-step pair lists jumps where two overlapping Gaussians swap depth order; the
frozen one does not. On a tiny float64 scene the frozen solve converges and its implicit gradient
matches central differences of the converged solve.
"""

import math

import pytest
import torch

from diff3r_plugin.data.synthetic import make_cameras, make_scene
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.errors import ConfigError
from diff3r_plugin.gaussians.layout import GROUPS, GaussianParams
from diff3r_plugin.layer import ContextViews, Objective, diff3r_layer
from diff3r_plugin.layer.layer import _visibility_staleness
from diff3r_plugin.render.api import render_params

F64 = torch.float64
SIZE = 16


def _two_gaussians(depth_b: float):
    """A red Gaussian at depth 4.0 and a blue one at ``depth_b``, overlapping on the optical axis."""
    means = torch.tensor([[[0.0, 0.0, 4.0], [0.02, 0.0, depth_b]]], dtype=F64)
    log_scales = torch.full((1, 2, 3), math.log(0.6), dtype=F64)
    quats = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]], dtype=F64)
    opac = torch.tensor([[2.0, 2.0]], dtype=F64)
    dc = torch.tensor([[[[1.0], [0.0], [0.0]], [[0.0], [0.0], [1.0]]]], dtype=F64)
    return GaussianParams(means, log_scales, quats, opac, dc, dc[..., :0], torch.zeros(1, 0, 6, dtype=F64))


def _swap_problem():
    cams = make_cameras(1, dtype=F64)
    start = _two_gaussians(4.01)  # blue behind red
    images = render_params(_two_gaussians(3.99), *cams, (SIZE, SIZE)).color  # blue in front
    views = ContextViews(images, *cams)
    lam = start.layout.per_group({g: 1.0 for g in GROUPS}, dtype=F64)
    return views, start, lam


def _energy_across_the_swap(visibility: str) -> tuple[float, float]:
    """Energies just before and just after the blue Gaussian's depth crosses the red one's."""
    views, start, lam = _swap_problem()
    obj = Objective.for_layer(views, start.layout, Diff3RConfig(visibility=visibility), start.flatten())
    theta0 = start.flatten()
    slot = start.layout.slices["means"].start + 3 + 2  # z of the second Gaussian
    energies = []
    for z in (4.0 + 1e-6, 4.0 - 1e-6):
        theta = theta0.clone()
        theta[0, slot] = z
        energies.append(float(obj.energy(theta, theta0, lam)))
    return energies[0], energies[1]


def test_frozen_visibility_removes_the_depth_swap_jump():
    before, after = _energy_across_the_swap("per_step")
    assert abs(after - before) > 1e-2  # the composite switches from red-over-blue to blue-over-red
    before, after = _energy_across_the_swap("frozen")
    # Held order: only the proximal term and the projection move, by O(2e-6).
    assert abs(after - before) < 1e-5, (before, after)


def test_staleness_counts_the_reordered_pixels():
    views, start, lam = _swap_problem()
    obj = Objective.for_layer(views, start.layout, Diff3RConfig(visibility="frozen"), start.flatten())
    pairs, pixels = _visibility_staleness(obj, start.flatten())
    assert pairs.tolist() == [0] and pixels.tolist() == [0]
    swapped = _two_gaussians(3.99).flatten()
    pairs, pixels = _visibility_staleness(obj, swapped)
    plan = obj.make_plan(start.flatten())
    both = int((torch.bincount(plan.pixel, minlength=SIZE * SIZE) == 2).sum())
    # Moving the blue Gaussian 0.02 closer also grows its footprint by a few edge pairs; every
    # pixel the two share changes order.
    print(f"\nstale pairs {pairs.tolist()}, reordered pixels {pixels.tolist()} of {both} shared")
    assert both > 10 and 0 <= int(pairs[0]) <= 8
    assert both - int(pairs[0]) <= int(pixels[0]) <= both


def test_layer_reports_frozen_visibility_and_leaves_inputs_alone():
    views, start, lam = _swap_problem()
    theta0 = start.flatten()
    keep = theta0.clone(), lam.clone(), views.images.clone()
    theta_star, info = diff3r_layer(theta0, lam, views, start.layout,
                                    Diff3RConfig(steps=5, inner_solver="lm", visibility="frozen"))
    assert info.visibility == "frozen" and info.summary()["visibility"] == "frozen"
    assert info.stale_pairs.shape == (1,) and info.stale_order_pixels.shape == (1,)
    assert int(info.stale_pairs[0]) >= 0 and int(info.stale_order_pixels[0]) >= 0
    assert bool(torch.isfinite(theta_star).all()) and float(info.stationarity[0]) < 1
    for before, now in zip(keep, (theta0, lam, views.images)):
        assert torch.equal(before, now)
    _, info = diff3r_layer(theta0, lam, views, start.layout, Diff3RConfig(steps=5, inner_solver="lm"))
    assert info.visibility == "per_step" and info.stale_pairs is None


def test_frozen_visibility_needs_the_torch_backend():
    views, start, lam = _swap_problem()
    with pytest.raises(ConfigError, match="visibility='frozen' needs the torch backend"):
        diff3r_layer(start.flatten(), lam, views, start.layout,
                     Diff3RConfig(steps=2, visibility="frozen", backend="gsplat"))


def test_frozen_implicit_gradient_matches_finite_differences():
    """Converged LM on the frozen energy; the exact-Hessian implicit gradient against central
    differences of the converged solve along random directions of theta0 and Lambda."""
    s = make_scene(12, 10, 2, dtype=F64, seed=2)
    layout = s.params.layout
    theta0 = s.params.flatten()
    gen = torch.Generator().manual_seed(5)
    truth = GaussianParams.unflatten(theta0 + 0.03 * torch.randn(theta0.shape, generator=gen, dtype=F64), layout)
    images = render_params(truth, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    lam = layout.per_group({g: 0.5 for g in GROUPS}, dtype=F64)
    target = make_scene(12, 10, 3, dtype=F64, seed=7)
    tcam = (target.extrinsics[:, 1:2], target.intrinsics[:, 1:2], target.near[:, 1:2], target.far[:, 1:2])
    cfg = Diff3RConfig(steps=40, inner_solver="lm", stationarity_tol=1e-12, pcg_tol=1e-10, pcg_maxiter=2000,
                       matvec="autodiff", hessian="exact", visibility="frozen")
    # The pair lists are built at each row's own theta0, so the layer is piecewise smooth in
    # theta0: its step stays small enough to keep every perturbed row's pair lists (1e-3 does
    # not). Lambda does not change them; its (relative) step is larger, against rounding.
    k, eps, eps_l = 2, 1e-4, 1e-3
    u = torch.randn(k, layout.numel, generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    w = torch.randn(k, layout.numel, generator=gen, dtype=F64)
    dlam = lam * (w / w.norm(dim=1, keepdim=True))
    t_leaf, l_leaf = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    rows_t = torch.cat([t_leaf, theta0 + eps * u, theta0 - eps * u, theta0.expand(2 * k, -1)])
    rows_l = torch.cat([l_leaf, lam.expand(2 * k, -1), lam + eps_l * dlam, lam - eps_l * dlam])
    b = rows_t.shape[0]

    def expand(t):
        return t.expand(b, *t.shape[1:])

    views = ContextViews(expand(images), expand(s.extrinsics), expand(s.intrinsics), expand(s.near), expand(s.far))
    theta_star, info = diff3r_layer(rows_t, rows_l, views, layout, cfg)
    assert float(info.stationarity.max()) < 1e-8, info.stationarity.tolist()
    color = render_params(GaussianParams.unflatten(theta_star, layout), *(expand(t) for t in tcam), (10, 10)).color
    losses = (color ** 2).sum((1, 2, 3, 4))
    losses[0].backward()
    assert bool(info.pcg_converged[0])
    with torch.no_grad():
        fd_t = (losses[1:1 + k] - losses[1 + k:1 + 2 * k]) / (2 * eps)
        fd_l = (losses[1 + 2 * k:1 + 3 * k] - losses[1 + 3 * k:]) / (2 * eps_l)
    an_t = u @ t_leaf.grad[0]
    an_l = dlam @ l_leaf.grad[0]
    rel_t = ((an_t - fd_t).abs() / fd_t.abs()).tolist()
    rel_l = ((an_l - fd_l).abs() / fd_l.abs()).tolist()
    print(f"\nfrozen visibility, implicit vs FD: theta0 {rel_t}, Lambda {rel_l}")
    assert max(rel_t) <= 1e-3 and max(rel_l) <= 1e-3
