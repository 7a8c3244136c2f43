"""Adapters that connect the Diff3R layer to upstream feed-forward 3DGS repositories.

Adapter modules register themselves by name with :func:`register_adapter`; import them here.
"""

from .registry import available_adapters, get_adapter, register_adapter

__all__ = ["available_adapters", "get_adapter", "register_adapter"]
