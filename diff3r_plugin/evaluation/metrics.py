"""Image metrics, computed exactly as the upstream ``src/evaluation/metrics.py``.

* PSNR: both images clipped to [0, 1], MSE per image over (c, h, w), ``-10 log10(MSE)``.
* SSIM: scikit-image ``structural_similarity(win_size=11, gaussian_weights=True,
  channel_axis=0, data_range=1.0)`` per image, on CPU.
* LPIPS: the ``lpips`` package with the VGG trunk, inputs in [0, 1] (``normalize=True``).

LPIPS needs torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``), which upstream
downloads when the network is built. We never download and never fall back to random weights:
if the file is not in the torch hub cache, :func:`compute_lpips` returns ``None`` and
:func:`lpips_available` says why. To enable it, copy the file to
``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`` (it is what
``torchvision.models.vgg16(weights="IMAGENET1K_V1")`` downloads there on a connected machine).
"""

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import DataError, NonFiniteError, ShapeError

__all__ = [
    "VGG16_WEIGHTS_FILENAME",
    "compute_lpips",
    "compute_psnr",
    "compute_ssim",
    "lpips_available",
    "summarize",
    "vgg16_weights_path",
]

VGG16_WEIGHTS_FILENAME = "vgg16-397923af.pth"
# torchvision names hub files <name>-<first 8 hex digits of the SHA-256 of the file>.
_VGG16_SHA256_PREFIX = "397923af"

_lpips_models: dict[str, torch.nn.Module] = {}
_checked_files: dict[tuple[str, int, int], tuple[bool, str]] = {}
_warned_unavailable = False


def _check_pair(ground_truth: Tensor, predicted: Tensor, name: str) -> None:
    if ground_truth.ndim != 4 or ground_truth.shape != predicted.shape:
        raise ShapeError(
            f"{name}: expected two image batches of the same shape [batch, 3, height, width], got "
            f"{tuple(ground_truth.shape)} and {tuple(predicted.shape)}"
        )
    for label, t in (("ground truth", ground_truth), ("prediction", predicted)):
        if not t.is_floating_point():
            raise ShapeError(f"{name}: {label} must be a float image in [0, 1], got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name}: {label} contains NaN or Inf")


@torch.no_grad()
def compute_psnr(
    ground_truth: Float[Tensor, "batch channel height width"],
    predicted: Float[Tensor, "batch channel height width"],
) -> Float[Tensor, " batch"]:
    """PSNR per image, ``-10 log10(mean((clip(gt) - clip(pred))^2))`` (peak 1).

    Args:
        ground_truth: Reference images in [0, 1].
        predicted: Rendered images (clipped to [0, 1] first, as upstream).

    Returns:
        PSNR in dB per image; ``inf`` for identical images (as upstream).
    """
    _check_pair(ground_truth, predicted, "compute_psnr")
    ground_truth = ground_truth.clip(min=0, max=1)
    predicted = predicted.clip(min=0, max=1)
    mse = ((ground_truth - predicted) ** 2).mean(dim=(1, 2, 3))
    return -10 * mse.log10()


@torch.no_grad()
def compute_ssim(
    ground_truth: Float[Tensor, "batch channel height width"],
    predicted: Float[Tensor, "batch channel height width"],
) -> Float[Tensor, " batch"]:
    """SSIM per image with scikit-image, using the upstream settings.

    ``structural_similarity(win_size=11, gaussian_weights=True, channel_axis=0,
    data_range=1.0)``; like upstream the images are *not* clipped.

    Args:
        ground_truth: Reference images in [0, 1], at least 11x11.
        predicted: Rendered images.

    Returns:
        SSIM per image, on ``predicted``'s device and dtype.
    """
    from skimage.metrics import structural_similarity

    _check_pair(ground_truth, predicted, "compute_ssim")
    if min(ground_truth.shape[-2:]) < 11:
        raise ShapeError(
            f"compute_ssim: images must be at least 11x11 for the 11x11 SSIM window, got "
            f"{tuple(ground_truth.shape[-2:])}"
        )
    values = [
        structural_similarity(
            gt.detach().cpu().numpy(),
            hat.detach().cpu().numpy(),
            win_size=11,
            gaussian_weights=True,
            channel_axis=0,
            data_range=1.0,
        )
        for gt, hat in zip(ground_truth, predicted)
    ]
    return torch.tensor(values, dtype=predicted.dtype, device=predicted.device)


def vgg16_weights_path() -> Path:
    """Where torchvision keeps the VGG16 ImageNet weights LPIPS needs (torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS_FILENAME


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[: len(_VGG16_SHA256_PREFIX)]


def lpips_available() -> tuple[bool, str]:
    """Whether LPIPS (VGG) can be computed here without any download.

    Checks that the ``lpips`` package imports and that ``vgg16-397923af.pth`` is in the torch
    hub cache with the right checksum (so a truncated download is not used).

    Returns:
        ``(True, description)`` or ``(False, reason)``.
    """
    try:
        import lpips  # noqa: F401
    except ImportError as exc:
        return False, f"LPIPS unavailable: the 'lpips' package cannot be imported ({exc})"
    path = vgg16_weights_path()
    if not path.is_file():
        return False, (
            f"LPIPS unavailable: torchvision VGG16 weights ({VGG16_WEIGHTS_FILENAME}) are not in "
            f"the torch hub cache ({path.parent}) and cannot be downloaded offline"
        )
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _checked_files:
        # Hashing 528 MB takes a second or two, so do it once per file version.
        prefix = _sha256_prefix(path)
        if prefix != _VGG16_SHA256_PREFIX:
            _checked_files[cache_key] = (False, (
                f"LPIPS unavailable: {path} does not match torchvision's VGG16 weights (SHA-256 "
                f"starts with {prefix}, expected {_VGG16_SHA256_PREFIX}); it may be a truncated "
                "download"
            ))
        else:
            _checked_files[cache_key] = (True, f"LPIPS (VGG trunk) with weights from {path}")
    return _checked_files[cache_key]


def _load_vgg_features(net: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy torchvision ``vgg16`` ``features.<i>.*`` weights into lpips' sliced VGG trunk.

    ``lpips.pretrained_networks.vgg16`` re-registers ``features[i]`` as ``slice<k>.<i>``, so
    the layer index ``i`` is kept and maps one to one.
    """
    with torch.no_grad():
        for name, param in net.named_parameters():
            _, index, kind = name.split(".")
            source = state.get(f"features.{index}.{kind}")
            if source is None or source.shape != param.shape:
                raise DataError(
                    f"VGG16 weights: features.{index}.{kind} is missing or has the wrong shape "
                    f"(need {tuple(param.shape)}); is this torchvision's vgg16-397923af.pth?"
                )
            param.copy_(source)


def _build_lpips(weights_path: Path, device: torch.device) -> torch.nn.Module:
    import lpips

    with warnings.catch_warnings():
        # pnet_rand=True makes lpips call torchvision's vgg16(pretrained=False): no download,
        # only a deprecation warning about the argument name. The trunk is filled below.
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    _load_vgg_features(model.net, torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def compute_lpips(
    ground_truth: Float[Tensor, "batch channel height width"],
    predicted: Float[Tensor, "batch channel height width"],
) -> Float[Tensor, " batch"] | None:
    """LPIPS (VGG) per image, as upstream: ``LPIPS(net="vgg")(gt, pred, normalize=True)``.

    Args:
        ground_truth: Reference images in [0, 1].
        predicted: Rendered images in [0, 1].

    Returns:
        LPIPS per image, or ``None`` when the VGG16 weights are not available offline
        (see :func:`lpips_available` for the reason; a warning is issued once).
    """
    global _warned_unavailable
    _check_pair(ground_truth, predicted, "compute_lpips")
    ok, reason = lpips_available()
    if not ok:
        if not _warned_unavailable:
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
            _warned_unavailable = True
        return None
    key = str(predicted.device)
    if key not in _lpips_models:
        _lpips_models[key] = _build_lpips(vgg16_weights_path(), predicted.device)
    model = _lpips_models[key]
    value = model.forward(ground_truth, predicted, normalize=True)
    return value[:, 0, 0, 0]


def summarize(values: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """Mean of each metric.

    Args:
        values: ``{metric: [value per scene or view]}``. ``None`` entries (e.g. LPIPS when it
            is unavailable) are left out.

    Returns:
        ``{metric: mean}``; ``nan`` for a metric with no values.
    """
    summary = {}
    for name, items in values.items():
        kept = [float(v) for v in items if v is not None]
        summary[name] = float(np.mean(kept)) if kept else math.nan
    return summary
