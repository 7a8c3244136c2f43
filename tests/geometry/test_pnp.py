"""PnP and the normalized projection against known poses (geometry/pnp.py, geometry/projection.py)."""

import pytest
import torch

from diff3r_plugin.errors import ShapeError
from diff3r_plugin.geometry.cameras import invert_rigid, se3_exp
from diff3r_plugin.geometry.pnp import solve_pnp
from diff3r_plugin.geometry.projection import pixel_centers, pixel_rays, project

F64 = torch.float64
TAUS = torch.tensor([[0.3, -0.1, 0.2, 0.05, 0.1, -0.07],
                     [1.0, 0.2, -0.3, -0.2, 0.3, 0.1],
                     [-0.4, 0.1, 0.5, 0.6, -0.4, 0.2]], dtype=F64)


def _scene(n: int = 300, seed: int = 3):
    """Points in front of every camera of TAUS, and their exact normalized coordinates."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(len(TAUS), n, 3, generator=gen, dtype=F64) * 0.7
    points[..., 2] += 4.0
    w2c = se3_exp(TAUS)
    cam = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]
    assert bool((cam[..., 2] > 1.0).all())
    return points, cam[..., :2] / cam[..., 2:], w2c


def test_pixel_centers_are_row_major_half_pixel_offsets():
    xy = pixel_centers(2, 4, dtype=F64)
    assert xy.shape == (8, 2)
    torch.testing.assert_close(xy[:4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=F64))
    torch.testing.assert_close(xy[:, 1], torch.tensor([0.25] * 4 + [0.75] * 4, dtype=F64))
    corner = pixel_centers(2, 4, offset=(0.0, 0.0), dtype=F64)
    torch.testing.assert_close(corner[5], torch.tensor([0.25, 0.5], dtype=F64))


def test_pixel_rays_project_back_to_their_pixel():
    k = torch.tensor([[0.9, 0, 0.52], [0, 0.8, 0.45], [0, 0, 1.0]], dtype=F64).expand(2, 3, 3)
    rays = pixel_rays(k, 3, 5)
    assert rays.shape == (2, 15, 3)
    torch.testing.assert_close(rays[..., 2], torch.ones(2, 15, dtype=F64))
    back = rays @ k.transpose(-1, -2)
    torch.testing.assert_close(back[..., :2], pixel_centers(3, 5, dtype=F64).expand(2, 15, 2))


def test_project_matches_hand_computed_point():
    w2c = torch.eye(4, dtype=F64)
    w2c[:3, 3] = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    uv = project(torch.tensor([[1.0, 2.0, 2.0]], dtype=F64), w2c)
    torch.testing.assert_close(uv, torch.tensor([[1.5 / 4.0, 1.0 / 4.0]], dtype=F64))


def test_pnp_recovers_known_poses_batched():
    points, coords, w2c = _scene()
    est = solve_pnp(points, coords)
    assert est.shape == (3, 4, 4) and est.dtype == F64
    assert float((est - w2c).abs().max()) < 1e-9


def test_pnp_unbatched_equals_batched_and_keeps_dtype():
    points, coords, w2c = _scene(n=64)
    batched = solve_pnp(points.float(), coords.float())
    for i in range(len(TAUS)):
        single = solve_pnp(points[i].float(), coords[i].float())
        assert single.shape == (4, 4) and single.dtype == torch.float32
        torch.testing.assert_close(single, batched[i], atol=1e-6, rtol=0)
        assert float((single.double() - w2c[i]).abs().max()) < 1e-4


def test_pnp_zero_weights_ignore_outliers():
    points, coords, w2c = _scene()
    corrupted = coords.clone()
    corrupted[:, :40] += 0.5  # wrong matches
    weights = torch.ones(points.shape[:2], dtype=F64)
    weights[:, :40] = 0
    assert float((solve_pnp(points, corrupted) - w2c).abs().max()) > 1e-2
    assert float((solve_pnp(points, corrupted, weights) - w2c).abs().max()) < 1e-9


def test_pnp_with_noise_stays_close_and_refinement_lowers_the_error():
    points, coords, w2c = _scene(n=500)
    gen = torch.Generator().manual_seed(0)
    noisy = coords + 1e-3 * torch.randn(coords.shape, generator=gen, dtype=F64)

    def reprojection(pose):
        return ((project(points, pose) - noisy) ** 2).sum((1, 2))

    dlt = solve_pnp(points, noisy, refine_iters=0)
    refined = solve_pnp(points, noisy)
    assert bool((reprojection(refined) <= reprojection(dlt)).all())
    # The true pose is not the least-squares one under noise, but close to it.
    assert float((refined - w2c).abs().max()) < 2e-2
    # Camera-to-world by the exact rigid inverse is what the adapters hand to the layer.
    c2w = invert_rigid(refined)
    torch.testing.assert_close(c2w @ refined, torch.eye(4, dtype=F64).expand(3, 4, 4),
                               atol=1e-12, rtol=0)


@pytest.mark.user_errors
def test_pnp_rejects_too_few_or_mismatched_matches():
    points, coords, _ = _scene(n=5)
    with pytest.raises(ShapeError, match="at least 6"):
        solve_pnp(points, coords)
    points, coords, _ = _scene(n=10)
    with pytest.raises(ShapeError, match="image_points"):
        solve_pnp(points, coords[:, :9])
    with pytest.raises(ShapeError, match="weights"):
        solve_pnp(points, coords, torch.ones(3, 9, dtype=F64))
