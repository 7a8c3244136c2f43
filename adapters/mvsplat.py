"""MVSplat (donydchen/mvsplat): ``EncoderCostVolume``, pose-given, SH degree 4, e3nn basis.

``forward(context, global_step, deterministic=False, visualization_dump=None, scene_names=None)
-> Gaussians``; one Gaussian per pixel. The 9 degree-4 SH coefficients are not rendered by the
rasterizers and pass through TTO untouched.
"""

from .base import Adapter
from .registry import register_adapter

__all__ = ["MVSplatAdapter"]


@register_adapter("mvsplat")
class MVSplatAdapter(Adapter):
    name = "mvsplat"
    sh_basis = "e3nn"
    pose_free = False
    default_sh_degree = 4
    encoder_class_patterns = (r"^EncoderCostVolume$", r"MVSplat")
