"""The Lambda map: each pixel-aligned Gaussian's Lambda lands on its own context pixel."""

import math

import pytest
import torch

from diff3r_plugin.errors import InvalidLambdaError, ShapeError
from diff3r_plugin.evaluation.plots import lambda_per_pixel, save_lambda_map
from diff3r_plugin.gaussians.layout import GaussianLayout

V, H, W = 2, 3, 4


def _lam(layout):
    """Lambda of Gaussian i in group g: (i + 1) * 10^k(g), entries of a group differing."""
    parts = []
    for k, g in enumerate(("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest", "pose")):
        shape = layout.group_shape(g)
        if math.prod(shape) == 0:
            continue
        if g == "pose":
            parts.append(torch.full(shape, 7.0, dtype=torch.float64).reshape(-1))
            continue
        idx = torch.arange(1, layout.num_gaussians + 1, dtype=torch.float64) * 10.0 ** k
        per_entry = idx.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
        if per_entry.ndim > 1:  # entries a, b -> geometric mean sqrt(a b) = the index value
            flat = per_entry.reshape(layout.num_gaussians, -1)
            flat[:, 0] *= 2.0
            flat[:, 1] /= 2.0
        parts.append(per_entry.reshape(-1))
    return torch.cat(parts)


def test_each_gaussian_lands_on_its_own_pixel_view_major():
    layout = GaussianLayout(V * H * W, sh_degree=1, num_pose_views=1)
    lam = _lam(layout)
    assert lam.numel() == layout.numel
    maps = lambda_per_pixel(lam, layout, V, H, W)
    assert set(maps) == {"means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"}
    index = torch.arange(1, V * H * W + 1, dtype=torch.float64).reshape(V, H, W)
    for k, g in enumerate(maps):
        assert maps[g].shape == (V, H, W)
        torch.testing.assert_close(maps[g], index * 10.0 ** k, rtol=1e-12, atol=0)
    assert float(maps["means"][1, 0, 0]) == pytest.approx(H * W + 1)  # first pixel of view 1


@pytest.mark.user_errors
def test_not_one_gaussian_per_pixel_is_a_shape_error():
    layout = GaussianLayout(V * H * W + 1)
    with pytest.raises(ShapeError, match="not one per pixel"):
        lambda_per_pixel(torch.ones(layout.numel), layout, V, H, W)
    with pytest.raises(ShapeError, match="flat vector"):
        lambda_per_pixel(torch.ones(1, layout.numel), layout, V, H, W)


@pytest.mark.user_errors
def test_non_positive_lambda_is_rejected_and_input_untouched():
    layout = GaussianLayout(V * H * W)
    lam = torch.ones(layout.numel)
    lam[3] = 0.0
    before = lam.clone()
    with pytest.raises(InvalidLambdaError):
        lambda_per_pixel(lam, layout, V, H, W)
    assert torch.equal(lam, before)


def test_save_lambda_map_writes_a_png(tmp_path):
    layout = GaussianLayout(V * H * W)
    maps = lambda_per_pixel(torch.rand(layout.numel) + 0.1, layout, V, H, W)
    path = save_lambda_map(torch.rand(V, 3, H, W), maps, tmp_path / "lam.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
