"""Registry of upstream adapters, by name.

Adapters register themselves with :func:`register_adapter` when their module is imported.
Third-party distributions can add adapters without importing anything from here first by
declaring an entry point in the group ``diff3r_plugin.adapters``::

    [project.entry-points."diff3r_plugin.adapters"]
    mysplat = "mysplat_diff3r.adapter:MySplatAdapter"

Entry points are loaded lazily, on the first lookup of a name that is not registered yet, so
importing the plugin stays cheap and a broken third-party package cannot break ``import``.
"""

import difflib
import threading
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Iterable, List, TypeVar

from diff3r_plugin.errors import ConfigError, UnknownAdapterError

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_adapters",
    "get_adapter",
    "register_adapter",
]

#: Entry-point group scanned for third-party adapters.
ENTRY_POINT_GROUP: str = "diff3r_plugin.adapters"

T = TypeVar("T")

_REGISTRY: Dict[str, Any] = {}
# Entry points are scanned at most once per process (a failed scan is not retried either:
# the warning has been shown and rescanning would repeat it on every miss).
_ENTRY_POINTS_LOADED: bool = False
# RLock because loading an entry point imports a module whose decorator calls register_adapter.
_LOCK = threading.RLock()


def _normalize(name: str) -> str:
    """Canonical form of an adapter name: lower case, ``-`` and ``_`` equivalent."""
    return name.strip().lower().replace("-", "_")


def register_adapter(name: str, *, override: bool = False) -> Callable[[T], T]:
    """Class/factory decorator that registers an adapter under ``name``.

    Example::

        @register_adapter("mvsplat")
        class MVSplatAdapter(Adapter): ...

    Registering the *same* object twice is a no-op (modules can be re-imported, e.g. by
    entry-point loading after a direct import).

    Args:
        name: Adapter name as used in ``diff3r.adapter``; case-insensitive, ``-`` == ``_``.
        override: Replace an existing, different registration instead of raising.

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        ConfigError: If ``name`` is empty or not a string, or already registered to a
            different object and ``override`` is False.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"Adapter name must be a non-empty string; got {name!r}.")
    key = _normalize(name)
    if key == "auto":
        # "auto" is the config value meaning "detect the adapter"; it cannot name one.
        raise ConfigError("'auto' is reserved for adapter auto-detection and cannot be registered.")

    def decorator(obj: T) -> T:
        if not callable(obj):
            raise ConfigError(f"Adapter {name!r} must be a class or factory callable; got {obj!r}.")
        with _LOCK:
            existing = _REGISTRY.get(key)
            if existing is not None and existing is not obj and not override:
                raise ConfigError(
                    f"Adapter name {name!r} is already registered to {_qualname(existing)}; "
                    f"refusing to replace it with {_qualname(obj)}. Pass override=True to replace it."
                )
            _REGISTRY[key] = obj
        return obj

    return decorator


def get_adapter(name: str) -> Any:
    """Returns the adapter class or factory registered under ``name``.

    Args:
        name: Adapter name (case-insensitive, ``-`` == ``_``).

    Returns:
        The registered object (not an instance).

    Raises:
        UnknownAdapterError: If no adapter of that name is registered, even after loading the
            ``diff3r_plugin.adapters`` entry points. The message lists the known names and
            the closest match.
    """
    key = _normalize(name) if isinstance(name, str) else name
    with _LOCK:
        if key not in _REGISTRY:
            _load_entry_points()
        if key in _REGISTRY:
            return _REGISTRY[key]
        known = sorted(_REGISTRY)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(known) if known else "(none)"
    raise UnknownAdapterError(
        f"Unknown adapter {name!r}.{hint} Known adapters: {listing}. Third-party adapters are "
        f"found through the entry-point group {ENTRY_POINT_GROUP!r}."
    )


def available_adapters() -> List[str]:
    """Returns the sorted names of all adapters, including those from entry points."""
    with _LOCK:
        _load_entry_points()
        return sorted(_REGISTRY)


def _iter_entry_points() -> Iterable[Any]:
    """Entry points of :data:`ENTRY_POINT_GROUP`, for old and new ``importlib.metadata`` APIs."""
    # Looked up as a module global so tests can monkeypatch `registry.entry_points`.
    eps = entry_points()
    if hasattr(eps, "select"):  # Python >= 3.10: EntryPoints with .select()
        return eps.select(group=ENTRY_POINT_GROUP)
    # Python 3.9: a dict {group: [EntryPoint, ...]}
    return eps.get(ENTRY_POINT_GROUP, ())  # type: ignore[union-attr]


def _load_entry_points() -> None:
    """Loads and registers every entry point once; failures warn instead of raising.

    A loaded object that the module's own decorator has already registered is accepted as is;
    anything else is registered under the entry point's name.
    """
    global _ENTRY_POINTS_LOADED
    with _LOCK:
        if _ENTRY_POINTS_LOADED:
            return
        _ENTRY_POINTS_LOADED = True
        try:
            eps = list(_iter_entry_points())
        except Exception as exc:  # corrupt metadata of some unrelated distribution
            warnings.warn(f"Could not read entry points of group {ENTRY_POINT_GROUP!r}: {exc}", stacklevel=3)
            return
        for ep in eps:
            try:
                obj = ep.load()
            except Exception as exc:
                # One broken third-party adapter must not hide all the others.
                warnings.warn(
                    f"Could not load diff3r adapter entry point {ep.name!r} ({getattr(ep, 'value', '?')}): "
                    f"{type(exc).__name__}: {exc}",
                    stacklevel=3,
                )
                continue
            key = _normalize(ep.name)
            if _REGISTRY.get(key) is obj:
                continue
            try:
                register_adapter(ep.name)(obj)
            except ConfigError as exc:
                warnings.warn(f"Ignoring adapter entry point {ep.name!r}: {exc}", stacklevel=3)


def _qualname(obj: Any) -> str:
    """``module.QualName`` of a class/function, or its repr."""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    return f"{mod}.{qual}" if mod and qual else repr(obj)
