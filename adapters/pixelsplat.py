"""pixelSplat (dcharatan/pixelsplat): ``EncoderEpipolar``, pose-given, SH degree 4, e3nn basis.

``forward(context, global_step, deterministic=False, visualization_dump=None) -> Gaussians``.
Three Gaussians per pixel at test time (sampled from a depth distribution; deterministic with
``deterministic=True``); the layout does not need pixel alignment, so nothing changes for TTO.
"""

from .base import Adapter
from .registry import register_adapter

__all__ = ["PixelSplatAdapter"]


@register_adapter("pixelsplat")
class PixelSplatAdapter(Adapter):
    name = "pixelsplat"
    sh_basis = "e3nn"
    pose_free = False
    default_sh_degree = 4
    encoder_class_patterns = (r"^EncoderEpipolar$", r"PixelSplat")
