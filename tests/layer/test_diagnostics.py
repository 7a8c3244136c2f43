"""Where the remaining inner gradient sits, and the line probe that finds jumps of the energy."""

import math

import torch

from diff3r_plugin.data.synthetic import make_cameras, make_scene
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.gaussians.layout import GROUPS, GaussianLayout, GaussianParams
from diff3r_plugin.layer import ContextViews, Objective, diff3r_layer
from diff3r_plugin.layer.diagnostics import gaussian_entry_mask, gradient_breakdown, top_gaussians
from diff3r_plugin.layer.probe import energy_line_probe, plan_changes, probe_summary
from diff3r_plugin.render.api import render_params


F64 = torch.float64


def make_problem(seed=0, g=8, size=8):
    """A tiny float64 scene whose context images come from a perturbed copy of theta0."""
    s = make_scene(g, size, 2, dtype=F64, seed=seed)
    layout = s.params.layout
    theta0 = s.params.flatten()
    gen = torch.Generator().manual_seed(seed + 100)
    truth = GaussianParams.unflatten(theta0 + 0.05 * torch.randn(theta0.shape, generator=gen, dtype=F64), layout)
    images = render_params(truth, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images.clamp(0, 1), s.extrinsics, s.intrinsics, s.near, s.far)
    lam = layout.per_group({name: 0.5 for name in GROUPS}, dtype=F64)
    return dict(views=views, layout=layout, theta0=theta0, lam=lam)


def test_breakdown_groups_add_up_and_share_is_exact():
    layout = GaussianLayout(200, sh_degree=1, num_pose_views=1)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(2, layout.numel, generator=gen, dtype=F64)
    g0 = torch.tensor([3.0, 0.0], dtype=F64)
    groups, share = gradient_breakdown(grad, g0, layout)
    assert set(groups) == set(GROUPS)
    total = torch.sqrt(sum(v[0] ** 2 for v in groups.values()))
    assert math.isclose(float(total), float(grad[0].norm() / 3.0), rel_tol=1e-12)
    assert all(float(v[1]) == 0.0 for v in groups.values())  # no initial gradient: reported as 0

    # All of the gradient in one Gaussian's mean and opacity: the top 1 % (2 Gaussians) hold it all.
    one = torch.zeros(1, layout.numel, dtype=F64)
    s = layout.slices
    one[0, s["means"].start + 3 * 17 + 1] = 2.0
    one[0, s["opacity_logits"].start + 17] = -1.0
    _, share_one = gradient_breakdown(one, torch.ones(1, dtype=F64), layout)
    assert float(share_one) == 1.0
    # Equal per-Gaussian gradients: ceil(1 % of 200) = 2 Gaussians hold 2/200 of it.
    flat = torch.zeros(1, layout.numel, dtype=F64)
    flat[0, s["opacity_logits"]] = 1.0
    _, share_flat = gradient_breakdown(flat, torch.ones(1, dtype=F64), layout)
    assert math.isclose(float(share_flat), 0.01, rel_tol=1e-12)
    # Gradient only in the pose: no Gaussian holds any of it.
    pose = torch.zeros(1, layout.numel, dtype=F64)
    pose[0, s["pose"]] = 1.0
    _, share_pose = gradient_breakdown(pose, torch.ones(1, dtype=F64), layout)
    assert float(share_pose) == 0.0
    _, share_zero = gradient_breakdown(torch.zeros(1, layout.numel, dtype=F64), torch.ones(1, dtype=F64), layout)
    assert float(share_zero) == 0.0


def test_top_gaussians_and_their_entries():
    layout = GaussianLayout(150, sh_degree=1, num_pose_views=1)
    grad = torch.zeros(2, layout.numel, dtype=F64)
    s = layout.slices
    grad[0, s["quats"].start + 4 * 17 + 2] = 5.0
    grad[0, s["means"].start + 3 * 99] = 1.0
    grad[0, s["pose"]] = 100.0  # not a Gaussian: never selected
    grad[1, s["sh_rest"].start + 9 * 3] = 1.0  # Gaussian 3 (3 colours x 3 coefficients each)
    idx = top_gaussians(grad, layout)  # ceil(1.5) = 2 Gaussians
    assert idx.shape == (2, 2)
    assert idx[0].tolist() == [17, 99] and int(idx[1, 0]) == 3
    mask = gaussian_entry_mask(idx, layout)
    per_gaussian = 3 + 3 + 4 + 1 + 3 + 9
    assert mask.shape == grad.shape and int(mask[0].sum()) == 2 * per_gaussian
    assert bool(mask[0, s["quats"].start + 4 * 17 + 2]) and bool(mask[0, s["means"].start + 3 * 99])
    assert not bool(mask[:, s["pose"]].any())
    split = layout.split(mask[:1].double())
    assert float(split["sh_rest"][0, 17].sum()) == 9 and float(split["sh_rest"][0, 16].sum()) == 0


def test_layer_reports_where_the_gradient_sits():
    p = make_problem()
    views, layout, theta0, lam = p["views"], p["layout"], p["theta0"], p["lam"]
    for solver in ("lm", "adam"):
        cfg = Diff3RConfig(steps=3, inner_solver=solver, stationarity_tol=0.0)
        _, info = diff3r_layer(theta0, lam, views, layout, cfg)
        groups = info.stationarity_groups
        assert set(groups) == set(GROUPS)
        recombined = torch.sqrt(sum(v ** 2 for v in groups.values()))
        torch.testing.assert_close(recombined, info.stationarity, rtol=1e-9, atol=0)
        assert info.final_grad.shape == theta0.shape and bool(torch.isfinite(info.final_grad).all())
        share = float(info.grad_share_top1pct[0])
        assert 0.0 < share <= 1.0
        summary = info.summary()
        assert math.isclose(summary["grad_share_top1pct"], share, rel_tol=1e-6)  # summary is float32
        assert set(summary["stationarity_groups"]) == set(GROUPS)


def test_probe_is_first_order_exact_on_a_smooth_stretch():
    p = make_problem()
    views, layout, theta0, lam = p["views"], p["layout"], p["theta0"], p["lam"]
    obj = Objective(views, layout)
    theta = theta0 + 0.01 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    rows = energy_line_probe(obj, theta, theta0, lam, steps=(1e-7, 1e-6))
    for r in rows:
        assert int(r["pairs_changed"][0]) == 0 and int(r["order_changed_pixels"][0]) == 0
        # Second-order remainder t * |d^T H d| / (2 |g|): tiny for these steps.
        assert abs(float(r["ratio"][0]) - 1.0) < 1e-4, float(r["ratio"][0])
    assert probe_summary(rows)[0]["step"] == 1e-7
    assert theta.dtype == F64 and obj.views.images.dtype == F64  # inputs are left as they were


def _two_gaussians(depth_a: float, depth_b: float):
    """Two large overlapping Gaussians on the optical axis of one camera."""
    extr, intr, near, far = make_cameras(1, dtype=F64)
    means = torch.tensor([[[0.0, 0.0, depth_a], [0.02, 0.0, depth_b]]], dtype=F64)
    log_scales = torch.full((1, 2, 3), math.log(0.6), dtype=F64)  # about 2 px
    quats = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]], dtype=F64)
    opac = torch.tensor([[2.0, 2.0]], dtype=F64)
    dc = torch.tensor([[[[1.0], [0.0], [0.0]], [[0.0], [0.0], [1.0]]]], dtype=F64)
    params = GaussianParams(means, log_scales, quats, opac, dc, dc[..., :0], torch.zeros(1, 0, 6, dtype=F64))
    return params, (extr, intr, near, far)


def test_plan_changes_count_depth_swaps_and_pair_changes():
    size = 16
    front, cams = _two_gaussians(4.0, 4.01)
    back, _ = _two_gaussians(4.02, 4.01)  # the first Gaussian moved behind the second
    images = render_params(front, *cams, (size, size)).color
    views = ContextViews(images, *cams)
    obj = Objective(views, front.layout)
    pa = obj.make_plan(front.flatten())
    pb = obj.make_plan(back.flatten())
    # Pixels covered by both Gaussians: there, and only there, the order swaps.
    per_pixel = torch.bincount(pa.pixel, minlength=size * size)
    both = int((per_pixel == 2).sum())
    assert both > 10
    changed, order = plan_changes(pa, pb, 1, size * size)
    assert int(order) == both
    assert int(changed) <= 4  # the projections barely move: (almost) the same pair set
    same_changed, same_order = plan_changes(pa, pa, 1, size * size)
    assert int(same_changed) == 0 and int(same_order) == 0
    # A fainter second Gaussian covers fewer pixels: pairs leave the plan, the order is kept.
    faint = front.flatten().clone()
    faint[:, front.layout.slices["opacity_logits"].start + 1] = -3.0
    changed_f, order_f = plan_changes(pa, obj.make_plan(faint), 1, size * size)
    assert int(changed_f) > 0 and int(order_f) == 0


def test_probe_sees_the_jump_of_a_depth_swap():
    """Along a direction that moves one Gaussian through the other's depth, the energy jumps:
    the probe's ratio leaves 1 exactly at the steps where the order changes."""
    size = 16
    front, cams = _two_gaussians(4.0, 4.001)
    # The images are the render at theta (zero residuals, no data gradient); the proximal centre
    # lies 50 behind (weight 0.1) along the first mean's z, so -grad E moves exactly that coordinate back,
    # through the second Gaussian's depth after a step of 1e-3.
    images = render_params(front, *cams, (size, size)).color
    views = ContextViews(images, *cams)
    layout = front.layout
    obj = Objective(views, layout)
    theta = front.flatten()
    theta0 = theta.clone()
    theta0[:, layout.slices["means"].start + 2] += 50.0
    lam = torch.ones_like(theta)
    lam[:, layout.slices["means"].start + 2] = 0.1
    rows = energy_line_probe(obj, theta, theta0, lam, steps=(1e-6, 1e-4, 1e-2))
    small, _, large = rows
    assert int(small["order_changed_pixels"][0]) == 0
    assert abs(float(small["ratio"][0]) - 1.0) < 1e-3
    assert int(large["order_changed_pixels"][0]) > 10
    assert abs(float(large["ratio"][0]) - 1.0) > 0.5, float(large["ratio"][0])
