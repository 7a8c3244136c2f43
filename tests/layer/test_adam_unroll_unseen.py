"""Unrolled Adam with a Gaussian that no context view sees but the outer loss does.

Its data gradient is identically zero, so its Adam moments stay zero and it never moves
(theta*_i = theta0_i, d theta*_i / d theta0_i = 1, d theta*_i / d Lambda_i = 0). The update
lr * m / (sqrt(v) + eps) has the derivative lr / eps ~ 1e12 w.r.t. m there; unrolled, that used
to multiply the entry's adjoint by ~1e11 per step (zero after cancellation for K <= 3, inf/NaN
after ~4 steps in float32).
"""

import torch

from diff3r_plugin.data.synthetic import make_cameras, make_scene
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.gaussians.layout import GROUPS, GaussianParams
from diff3r_plugin.layer import ContextViews, diff3r_layer
from diff3r_plugin.render.api import render_params


def test_unrolled_adam_gradient_of_unseen_gaussian_is_finite_and_exact():
    s = make_scene(16, 12, 2, seed=0)
    layout = s.params.layout
    images = render_params(s.params, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images, s.extrinsics, s.intrinsics, s.near, s.far)
    params = GaussianParams.unflatten(s.params.flatten() + 0.05, layout)
    # Gaussian 0: small, outside both context frustums (|x / z| ~ 1 > 0.56), inside a wide target
    # view (tan(fov / 2) = 1.25).
    params.means[0, 0] = torch.tensor([3.0, 0.0, 3.0])
    params.log_scales[0, 0] = -3.5
    params.opacity_logits[0, 0] = 2.0
    params.sh_dc[0, 0] = 0.3
    e, k, n, f = make_cameras(3, focal=0.4)
    target = (e[:, 1:2], k[:, 1:2], n[:, 1:2], f[:, 1:2])

    theta0 = params.flatten().requires_grad_(True)
    lam = layout.per_group({g: 1.0 for g in GROUPS}).requires_grad_(True)
    cfg = Diff3RConfig(steps=6, inner_solver="adam", stationarity_tol=0.0, backward="unroll")
    theta_star, _ = diff3r_layer(theta0, lam, views, layout, cfg)
    theta_star.retain_grad()
    loss = (render_params(GaussianParams.unflatten(theta_star, layout), *target, s.image_shape).color ** 2).sum()
    loss.backward()

    assert torch.isfinite(theta0.grad).all() and torch.isfinite(lam.grad).all()
    unseen = torch.zeros(layout.num_gaussians, dtype=torch.bool)
    unseen[0] = True
    idx = torch.cat([unseen[:, None].expand(layout.num_gaussians, layout.group_numel(g) // layout.num_gaussians)
                     .reshape(-1) for g in GROUPS if layout.group_numel(g)])
    assert torch.equal(theta_star.detach()[0, idx], theta0.detach()[0, idx])  # it does not move
    assert theta_star.grad[0, idx].abs().max() > 1e-3  # the outer loss sees it
    torch.testing.assert_close(theta0.grad[0, idx], theta_star.grad[0, idx])
    assert torch.equal(lam.grad[0, idx], torch.zeros_like(lam.grad[0, idx]))
