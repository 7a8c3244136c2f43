"""Built-in tiny encoders (pose-given MVSplat-style, pose-free NoPoSplat-style)."""

from .tiny import EncoderOutput, TinyPoseFreeEncoder, TinyPoseGivenEncoder, to_relative_frame

__all__ = ["EncoderOutput", "TinyPoseFreeEncoder", "TinyPoseGivenEncoder", "to_relative_frame"]
