"""Tests of PSNR / SSIM / LPIPS against closed forms and scikit-image."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from diff3r_plugin.errors import NonFiniteError, ShapeError
from diff3r_plugin.evaluation import metrics
from diff3r_plugin.evaluation.metrics import (
    compute_lpips,
    compute_psnr,
    compute_ssim,
    lpips_available,
    summarize,
    vgg16_weights_path,
)


def _images(batch: int = 2, h: int = 32, w: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 0.8 + 0.1


def test_psnr_of_known_mse() -> None:
    gt = _images()
    torch.testing.assert_close(compute_psnr(gt, gt + 0.1), torch.full((2,), 20.0))
    # An offset of 0.01 gives MSE 1e-4 -> 40 dB.
    torch.testing.assert_close(compute_psnr(gt, gt - 0.01), torch.full((2,), 40.0), atol=1e-3, rtol=0)


def test_psnr_per_image_and_clipping() -> None:
    gt = torch.zeros(2, 3, 8, 8)
    pred = torch.zeros(2, 3, 8, 8)
    pred[0] = 0.5  # MSE 0.25 -> 6.0206 dB
    pred[1, 0] = 3.0  # clipped to 1 in one channel: MSE 1/3 -> 4.7712 dB
    torch.testing.assert_close(compute_psnr(gt, pred), torch.tensor([-10 * math.log10(0.25),
                                                                     -10 * math.log10(1 / 3)]))
    assert compute_psnr(gt, gt).isinf().all()  # identical images, as upstream


@pytest.mark.user_errors
def test_metric_input_errors() -> None:
    gt = _images()
    with pytest.raises(ShapeError, match=r"compute_psnr.*\(2, 3, 32, 40\) and \(2, 3, 32, 39\)"):
        compute_psnr(gt, gt[..., :39])
    with pytest.raises(ShapeError, match="batch, 3, height, width"):
        compute_ssim(gt[0], gt[0])
    bad = gt.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="prediction contains NaN"):
        compute_psnr(gt, bad)
    with pytest.raises(ShapeError, match="at least 11x11"):
        compute_ssim(gt[..., :10, :10], gt[..., :10, :10])


def test_ssim_identical_is_one_and_noisy_matches_skimage() -> None:
    gt = _images(batch=3)
    torch.testing.assert_close(compute_ssim(gt, gt), torch.ones(3))
    noisy = (gt + 0.05 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ssim = compute_ssim(gt, noisy)
    expected = [
        structural_similarity(a.numpy(), b.numpy(), win_size=11, gaussian_weights=True,
                              channel_axis=0, data_range=1.0)
        for a, b in zip(gt, noisy)
    ]
    assert ssim.dtype == torch.float32 and ssim.shape == (3,)
    np.testing.assert_allclose(ssim.numpy(), expected, rtol=1e-6)
    assert (ssim < 0.99).all() and (ssim > 0.3).all()


def test_lpips_unavailable_without_cached_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(metrics, "_warned_unavailable", False)
    ok, reason = lpips_available()
    assert not ok
    assert "vgg16-397923af.pth" in reason and "torch hub cache" in reason and "offline" in reason
    gt = _images()
    with pytest.warns(RuntimeWarning, match="LPIPS unavailable"):
        assert compute_lpips(gt, gt) is None


def test_lpips_rejects_a_wrong_weights_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(metrics, "_warned_unavailable", True)
    path = vgg16_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated download")
    ok, reason = lpips_available()
    assert not ok and "does not match torchvision's VGG16 weights" in reason
    assert compute_lpips(_images(), _images()) is None


def test_vgg_weights_map_onto_lpips_trunk() -> None:
    # Offline stand-in for the real file: a torchvision-style state dict with known values.
    lpips_networks = pytest.importorskip("lpips.pretrained_networks")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trunk = lpips_networks.vgg16(pretrained=False)
    # torchvision's vgg16().features has its 13 convolutions at these indices.
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    shapes = {name.split(".", 1)[1]: p.shape for name, p in trunk.named_parameters()}
    assert sorted({int(k.split(".")[0]) for k in shapes}) == conv_indices
    state = {}
    for n, i in enumerate(conv_indices):
        state[f"features.{i}.weight"] = torch.full(shapes[f"{i}.weight"], float(n))
        state[f"features.{i}.bias"] = torch.full(shapes[f"{i}.bias"], -float(n))
    state["classifier.0.weight"] = torch.zeros(1)  # ignored, as in the real file
    metrics._load_vgg_features(trunk, state)
    for name, param in trunk.named_parameters():
        n = conv_indices.index(int(name.split(".")[1]))
        assert torch.all(param == (n if name.endswith("weight") else -n)), name
    del state["features.28.bias"]
    with pytest.raises(ValueError, match=r"features\.28\.bias is missing"):
        metrics._load_vgg_features(trunk, state)


@pytest.mark.skipif(not vgg16_weights_path().is_file(),
                    reason="torchvision VGG16 weights are not in the torch hub cache (offline)")
def test_lpips_with_real_weights() -> None:
    ok, reason = lpips_available()
    assert ok, reason
    gt = _images(h=64, w=64)
    torch.testing.assert_close(compute_lpips(gt, gt), torch.zeros(2), atol=1e-6, rtol=0)
    noisy = (gt + 0.2 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    value = compute_lpips(gt, noisy)
    assert value.shape == (2,) and (value > 0.05).all()


def test_summarize() -> None:
    summary = summarize({"psnr": [20.0, 30.0], "ssim": [0.5, 0.7, 0.9], "lpips": [None, None], "x": []})
    assert summary["psnr"] == 25.0
    assert summary["ssim"] == pytest.approx(0.7)
    assert math.isnan(summary["lpips"]) and math.isnan(summary["x"])
