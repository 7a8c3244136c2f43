"""Built-in tiny encoders (pose-given MVSplat-style, pose-free NoPoSplat-style)."""

from .. import forward_ad_setup  # noqa: F401  (quiets torch's jit deprecation warning)
from .tiny import EncoderOutput, TinyPoseFreeEncoder, TinyPoseGivenEncoder, to_relative_frame

__all__ = ["EncoderOutput", "TinyPoseFreeEncoder", "TinyPoseGivenEncoder", "to_relative_frame"]
