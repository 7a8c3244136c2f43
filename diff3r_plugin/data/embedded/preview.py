"""PNG preview of an embedded scene: its views above their (inverse, grey) depth."""

from pathlib import Path
from typing import Union

import numpy as np
import torch

from .scene import EmbeddedScene

def save_preview(scene: EmbeddedScene, path: Union[str, Path], tile: int = 128,
                 max_views: int = 8) -> Path:
    """Write a PNG grid: the views on top, their depth (inverse, grey) below.

    Args:
        scene: The scene.
        path: Output ``.png`` path (parent folders are created).
        tile: Side of each tile in pixels (nearest-neighbour upscaling, to see real pixels).
        max_views: Show at most this many views, evenly spread.

    Returns:
        The path written.
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = scene.num_views
    picks = np.unique(np.linspace(0, n - 1, min(n, max_views)).round().astype(int))
    h, w = scene.image_shape
    scale = max(1, tile // max(h, w))
    disparity = 1.0 / scene.depths[picks]
    lo, hi = disparity.min(), disparity.max()
    disparity = (disparity - lo) / (hi - lo).clamp_min(1e-8)
    rows = [scene.images[picks], disparity[:, None].expand(-1, 3, -1, -1)]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, 2h, k*w]
    array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(array)
    image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    image.save(path)
    return path
