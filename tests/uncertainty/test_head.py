import pytest
import torch

from diff3r_plugin.gaussians.layout import GaussianLayout, random_params
from diff3r_plugin.uncertainty import UncertaintyHead, features_from_gaussians


def _feats(b=2, g=7, sh=1, pose=1):
    p = random_params(b, g, sh_degree=sh, num_pose_views=pose, generator=torch.Generator().manual_seed(0))
    return p, features_from_gaussians(p)


@pytest.mark.parametrize("granularity", ["group", "parameter"])
@pytest.mark.parametrize("init", [1.0, 0.05, 30.0])
def test_init_value_and_layout(granularity, init):
    p, f = _feats()
    head = UncertaintyHead(f.shape[-1], 1, 1, granularity=granularity, init=init, floor=1e-3)
    lam = head(f)
    layout = GaussianLayout(7, 1, 1)
    assert lam.shape == (2, layout.numel)
    assert torch.allclose(lam, torch.full_like(lam, init), rtol=1e-5)
    # Group-major slices of the layout.
    parts = layout.split(lam.detach())
    assert parts["means"].shape == (2, 7, 3) and parts["pose"].shape == (2, 1, 6)


def test_floor_holds():
    _, f = _feats()
    head = UncertaintyHead(f.shape[-1], 1, 1, floor=0.01, init=0.02)
    with torch.no_grad():
        head.out.bias.fill_(-1e4)
        head.pose_logit.fill_(-1e4)
    lam = head(f)
    assert bool((lam >= 0.01).all()) and torch.allclose(lam, torch.full_like(lam, 0.01))


def test_group_granularity_shares_within_group():
    _, f = _feats()
    head = UncertaintyHead(f.shape[-1], 1, 1)
    with torch.no_grad():
        head.out.weight.normal_()
    parts = GaussianLayout(7, 1, 1).split(head(f).detach())
    m = parts["means"]
    assert torch.allclose(m, m[..., :1].expand_as(m))
    assert not torch.allclose(m[:, 0], m[:, 1])  # differs across Gaussians
    assert torch.allclose(parts["pose"], parts["pose"].flatten()[0].expand_as(parts["pose"]))


def test_gradients_reach_head_and_lambda_changes():
    _, f = _feats()
    head = UncertaintyHead(f.shape[-1], 1, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    before = head(f).detach()
    loss = (head(f) * torch.linspace(-1, 1, before.shape[1])).sum()
    loss.backward()
    assert head.out.weight.grad is not None and head.out.weight.grad.abs().sum() > 0
    assert head.out.bias.grad.abs().sum() > 0 and head.pose_logit.grad.abs() > 0
    opt.step()
    after = head(f).detach()
    assert not torch.allclose(before, after)


def test_features_pixel_aligned():
    b, v, h, w = 1, 2, 3, 4
    p = random_params(b, v * h * w, generator=torch.Generator().manual_seed(1))
    imgs = torch.rand(b, v, 3, h, w)
    f = features_from_gaussians(p, imgs)
    assert torch.allclose(f[0, 5, 9:12], imgs[0, 0, :, 1, 1])
    assert bool((f[..., -1] == 1).all())
    f2 = features_from_gaussians(random_params(1, 5), imgs)
    assert bool((f2[..., -1] == 0).all())


def test_rejects_bad_args():
    with pytest.raises(ValueError):
        UncertaintyHead(4, 0, init=1e-5, floor=1e-4)
