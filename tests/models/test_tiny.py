import torch

from diff3r_plugin.data.embedded import EmbeddedDataset
from diff3r_plugin.models import TinyPoseFreeEncoder, TinyPoseGivenEncoder, to_relative_frame
from diff3r_plugin.gaussians.layout import check_covariances


def _batch():
    return EmbeddedDataset(1, image_shape=(16, 16))[0]


def _check(out, b, g, ctx):
    assert out.means.shape == (b, g, 3) and out.covariances.shape == (b, g, 3, 3)
    assert out.harmonics.shape[:3] == (b, g, 3) and out.opacities.shape == (b, g)
    assert out.features.shape[:2] == (b, g)
    assert not bool(check_covariances(out.covariances).any())
    assert torch.allclose(out.covariances, out.covariances.transpose(-1, -2), atol=1e-6)
    assert bool(((out.opacities > 0) & (out.opacities < 1)).all())
    assert bool(torch.isfinite(out.means).all())


def test_pose_given_shapes_and_depth_range():
    torch.manual_seed(0)
    ex = _batch()
    enc = TinyPoseGivenEncoder(width=8, num_depths=8)
    out = enc(ex["context"])
    _check(out, 1, 2 * 16 * 16, ex["context"])
    assert out.features.shape[-1] == enc.num_features
    d = out.extras["depth"]
    assert bool((d >= ex["context"]["near"].min() * 0.999).all())
    assert bool((d <= ex["context"]["far"].max() * 1.001).all())
    out.means.sum().backward()
    assert any(p.grad is not None for p in enc.parameters())


def test_pose_free_shapes_and_reference_frame():
    torch.manual_seed(0)
    ex = to_relative_frame(_batch())
    assert torch.allclose(ex["context"]["extrinsics"][0, 0], torch.eye(4), atol=1e-5)
    assert abs(float(ex["context"]["extrinsics"][0, 1, :3, 3].norm()) - 1) < 1e-5
    enc = TinyPoseFreeEncoder(width=8)
    ctx = dict(ex["context"])
    ctx["extrinsics"] = torch.full_like(ctx["extrinsics"], float("nan"))  # must not be read
    out = enc(ctx)
    _check(out, 1, 2 * 16 * 16, ctx)
    assert out.num_pose_views == 1
    assert torch.allclose(out.context_extrinsics[0, 0], torch.eye(4))
    # PnP from the encoder's own points recovers its predicted relative pose.
    assert torch.allclose(out.context_extrinsics[0, 1], out.extras["pred_c2w"][0, 1], atol=1e-3)
