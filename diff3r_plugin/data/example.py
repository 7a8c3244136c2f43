"""The upstream ``BatchedExample`` (batch size 1): the one place where its fields are laid out.

pixelSplat, MVSplat, DepthSplat and NoPoSplat feed their encoders ``batch["context"]`` and
render ``batch["target"]``, each a ``BatchedViews`` dict with ``extrinsics [b, v, 4, 4]``
(OpenCV camera-to-world), ``intrinsics [b, v, 3, 3]`` (normalized), ``image [b, v, 3, h, w]``
in [0, 1], ``near [b, v]``, ``far [b, v]`` and ``index [b, v]`` (int64 view indices), and
``batch["scene"]`` a list of scene keys. Both data sources (RE10K chunks and the embedded
scenes) build their examples here.
"""

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["upstream_example", "upstream_views"]


def upstream_views(
    images: Float[Tensor, "view 3 height width"],
    extrinsics: Float[Tensor, "view 4 4"],
    intrinsics: Float[Tensor, "view 3 3"],
    near: Float[Tensor, " view"],
    far: Float[Tensor, " view"],
    index: Sequence[int],
) -> dict[str, Tensor]:
    """One ``BatchedViews`` dict with batch size 1 (the tensors gain a leading axis of 1)."""
    return {
        "extrinsics": extrinsics[None],
        "intrinsics": intrinsics[None],
        "image": images[None],
        "near": near[None],
        "far": far[None],
        "index": torch.tensor([list(index)], dtype=torch.int64),
    }


def upstream_example(context: dict[str, Tensor], target: dict[str, Tensor],
                     key: str) -> dict[str, Any]:
    """``{"context": ..., "target": ..., "scene": [key]}``."""
    return {"context": context, "target": target, "scene": [key]}
