import math

import pytest
import torch

from diff3r_plugin.evaluation.lambda_overlap import frustum_visibility, lambda_overlap_ratio


def _cameras():
    # Two cameras at x = 0 and x = 1 looking down +z with a 90-degree field of view: at depth
    # 2, camera 0 sees x in [-2, 2] and camera 1 sees x in [-1, 3].
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, 0, 3] = 1.0
    k = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]).repeat(2, 1, 1)
    return c2w, k


def test_visibility_of_a_constructed_scene():
    c2w, k = _cameras()
    means = torch.tensor([[-1.5, 0.0, 2.0],   # camera 0 only
                          [0.5, 0.0, 2.0],    # both
                          [2.5, 0.0, 2.0],    # camera 1 only
                          [0.5, 0.0, -2.0],   # behind both
                          [9.0, 0.0, 2.0]])   # outside both
    seen = frustum_visibility(means, c2w, k)
    assert seen.tolist() == [[True, True, False, False, False], [False, True, True, False, False]]


def test_ratio_has_the_known_answer():
    c2w, k = _cameras()
    xs = torch.linspace(-1.9, 2.9, 49)
    means = torch.stack([xs, torch.zeros_like(xs), torch.full_like(xs, 2.0)], dim=-1)
    only_one = (xs < -1) | (xs > 2)
    lam = torch.where(only_one, 3.0, 1.0)[:, None].expand(-1, 3)
    out = lambda_overlap_ratio(lam, means, c2w, k)
    assert out["num_one_view"] == int(only_one.sum()) and out["num_all_views"] == int((~only_one).sum())
    assert out["ratio"] == pytest.approx(3.0)
    # Swapping the weights inverts the ratio: the measure is not symmetric by construction.
    out = lambda_overlap_ratio(torch.where(only_one, 1.0, 3.0), means, c2w, k)
    assert out["ratio"] == pytest.approx(1 / 3)


def test_ratio_is_none_without_one_of_the_sets():
    c2w, k = _cameras()
    means = torch.tensor([[0.5, 0.0, 2.0], [0.2, 0.1, 3.0]])
    out = lambda_overlap_ratio(torch.ones(2), means, c2w, k)
    assert out["ratio"] is None and out["num_one_view"] == 0


@pytest.mark.user_errors
def test_lambda_rows_must_match_the_gaussians():
    c2w, k = _cameras()
    means = torch.tensor([[0.5, 0.0, 2.0], [0.2, 0.1, 3.0]])
    with pytest.raises(ValueError, match="Λ rows"):
        lambda_overlap_ratio(torch.ones(3), means, c2w, k)
