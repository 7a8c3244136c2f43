"""Adapters that connect the Diff3R layer to upstream feed-forward 3DGS repositories.

Adapter modules register themselves by name with :func:`register_adapter`; the built-in ones
are imported here (and also declared as entry points of the group ``diff3r_plugin.adapters``).
"""

from .registry import available_adapters, get_adapter, register_adapter
from .base import Adapter, Diff3RState, WrapReport, unwrap_encoder
from .mvsplat import MVSplatAdapter
from .pixelsplat import PixelSplatAdapter
from .depthsplat import DepthSplatAdapter
from .noposplat import NoPoSplatAdapter

__all__ = ["Adapter", "DepthSplatAdapter", "Diff3RState", "MVSplatAdapter", "NoPoSplatAdapter",
           "PixelSplatAdapter", "WrapReport", "available_adapters", "detect_adapter",
           "get_adapter", "register_adapter", "unwrap_encoder"]


def detect_adapter(encoder) -> str:
    """Name of the registered adapter whose class patterns match ``encoder``'s class.

    Raises:
        UnknownAdapterError: If none matches (the message lists the known adapters).
    """
    from diff3r_plugin.errors import UnknownAdapterError

    names = available_adapters()
    for name in names:
        cls = get_adapter(name)
        if isinstance(cls, type) and issubclass(cls, Adapter) and cls.matches(encoder):
            return name
    raise UnknownAdapterError(
        f"Could not detect a diff3r adapter for encoder class {type(encoder).__name__!r}. Known "
        f"adapters: {', '.join(names)}. Set diff3r.adapter=<name> explicitly.")
