"""Tests of the adapter registry (decorator, lookup, entry-point discovery)."""

import importlib.metadata
from typing import Any, Callable, Dict, Iterator, List

import pytest

import diff3r_plugin.adapters as adapters_pkg
from diff3r_plugin.adapters import registry
from diff3r_plugin.adapters.registry import ENTRY_POINT_GROUP, available_adapters, get_adapter, register_adapter
from diff3r_plugin.errors import ConfigError, UnknownAdapterError


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Dict[str, Any]]:
    """Each test gets an empty registry and no real entry points (isolation from installed ones)."""
    fresh: Dict[str, Any] = {}
    monkeypatch.setattr(registry, "_REGISTRY", fresh)
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    _fake_entry_points(monkeypatch, [])
    yield fresh


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint: ``name``, ``group``, ``value``, ``load()``."""

    def __init__(self, name: str, loader: Callable[[], Any], group: str = ENTRY_POINT_GROUP) -> None:
        self.name, self.group, self.value = name, group, f"fake.module:{name}"
        self._loader = loader
        self.loads = 0

    def load(self) -> Any:
        self.loads += 1
        return self._loader()


class FakeEntryPoints(list):  # type: ignore[type-arg]
    """New (3.10+) API: a sequence with ``.select(group=...)``."""

    def select(self, *, group: str) -> List[FakeEntryPoint]:
        return [ep for ep in self if ep.group == group]


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, eps: List[FakeEntryPoint], old_api: bool = False) -> List[int]:
    """Replaces ``entry_points`` *in the registry module only*; returns a call counter."""
    calls: List[int] = []

    def entry_points() -> Any:
        calls.append(1)
        if old_api:  # Python 3.9: dict of group -> list
            grouped: Dict[str, List[FakeEntryPoint]] = {}
            for ep in eps:
                grouped.setdefault(ep.group, []).append(ep)
            return grouped
        return FakeEntryPoints(eps)

    monkeypatch.setattr(registry, "entry_points", entry_points)
    return calls


def test_exports() -> None:
    assert adapters_pkg.register_adapter is register_adapter
    assert adapters_pkg.get_adapter is get_adapter
    assert adapters_pkg.available_adapters is available_adapters


def test_register_and_get_class_and_factory() -> None:
    @register_adapter("mvsplat")
    class MVSplatAdapter:
        pass

    def make_noposplat() -> str:
        return "adapter"

    returned = register_adapter("NoPoSplat")(make_noposplat)
    assert returned is make_noposplat  # the decorator returns its argument unchanged
    assert get_adapter("mvsplat") is MVSplatAdapter
    assert get_adapter("noposplat") is make_noposplat
    assert get_adapter("NOPOSPLAT") is make_noposplat  # names are case-insensitive
    assert available_adapters() == ["mvsplat", "noposplat"]


def test_duplicate_name() -> None:
    class A:
        pass

    class B:
        pass

    register_adapter("pixelsplat")(A)
    register_adapter("pixelsplat")(A)  # same object again (module re-import): fine
    with pytest.raises(ConfigError) as info:
        register_adapter("pixelsplat")(B)
    msg = str(info.value)
    assert "pixelsplat" in msg and "override=True" in msg and "A" in msg and "B" in msg
    assert get_adapter("pixelsplat") is A
    register_adapter("pixelsplat", override=True)(B)
    assert get_adapter("pixelsplat") is B


@pytest.mark.user_errors
@pytest.mark.parametrize("bad", ["", "   ", 3, None, "auto"])
def test_bad_names(bad: Any) -> None:
    with pytest.raises(ConfigError):
        register_adapter(bad)


def test_non_callable_rejected() -> None:
    with pytest.raises(ConfigError, match="class or factory"):
        register_adapter("thing")(42)


def test_unknown_name_lists_known_sorted_and_close_match() -> None:
    for name in ["pixelsplat", "depthsplat", "mvsplat", "noposplat"]:
        register_adapter(name)(type(name, (), {}))
    with pytest.raises(UnknownAdapterError) as info:
        get_adapter("mvsplta")
    msg = str(info.value)
    assert "Known adapters: depthsplat, mvsplat, noposplat, pixelsplat." in msg
    assert "Did you mean 'mvsplat'?" in msg
    assert "'mvsplta'" in msg and ENTRY_POINT_GROUP in msg
    # It is both a ConfigError-family ValueError and a KeyError, and prints without repr quotes.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert not msg.startswith('"')


def test_unknown_name_with_empty_registry() -> None:
    with pytest.raises(UnknownAdapterError, match=r"Known adapters: \(none\)"):
        get_adapter("mvsplat")


@pytest.mark.parametrize("old_api", [False, True], ids=["select-api", "dict-api-py39"])
def test_entry_point_discovery(monkeypatch: pytest.MonkeyPatch, old_api: bool) -> None:
    class ThirdPartyAdapter:
        pass

    ep = FakeEntryPoint("mysplat", lambda: ThirdPartyAdapter)
    other_group = FakeEntryPoint("not_ours", lambda: object, group="something.else")
    calls = _fake_entry_points(monkeypatch, [ep, other_group], old_api=old_api)

    register_adapter("mvsplat")(type("MV", (), {}))
    assert calls == []  # lazy: nothing scanned while lookups hit
    assert get_adapter("mvsplat").__name__ == "MV"
    assert calls == []

    assert get_adapter("mysplat") is ThirdPartyAdapter  # first miss triggers the scan
    assert calls == [1] and ep.loads == 1
    assert available_adapters() == ["mvsplat", "mysplat"]
    with pytest.raises(UnknownAdapterError, match="Known adapters: mvsplat, mysplat"):
        get_adapter("nope")
    assert calls == [1] and ep.loads == 1  # scanned once per process


def test_entry_point_module_that_self_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point whose module registers itself (under its own name) is not registered twice."""

    def load() -> Any:
        @register_adapter("selfreg")
        class SelfRegistering:
            pass

        return SelfRegistering

    _fake_entry_points(monkeypatch, [FakeEntryPoint("selfreg", load)])
    cls = get_adapter("selfreg")
    assert cls.__name__ == "SelfRegistering" and available_adapters() == ["selfreg"]


def test_broken_entry_point_warns_and_others_still_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise ImportError("missing optional dependency")

    def good_factory() -> str:  # a plain factory is a valid adapter
        return "adapter"

    _fake_entry_points(monkeypatch, [FakeEntryPoint("broken", broken), FakeEntryPoint("good", lambda: good_factory)])
    with pytest.warns(UserWarning, match="broken.*missing optional dependency"):
        assert get_adapter("good") is good_factory
    with pytest.raises(UnknownAdapterError):
        get_adapter("broken")


def test_entry_point_conflicting_with_registered_name_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    class Builtin:
        pass

    class Impostor:
        pass

    register_adapter("mvsplat")(Builtin)
    _fake_entry_points(monkeypatch, [FakeEntryPoint("mvsplat", lambda: Impostor)])
    with pytest.warns(UserWarning, match="mvsplat"):
        assert available_adapters() == ["mvsplat"]
    assert get_adapter("mvsplat") is Builtin  # built-ins are not silently replaced


def test_real_entry_points_api_is_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the real importlib.metadata (no fake): the scan runs and does not raise."""
    monkeypatch.setattr(registry, "entry_points", importlib.metadata.entry_points)
    names = available_adapters()
    assert names == sorted(names)
