"""Hydra composition of an upstream config with the plugin's config groups on the search path."""

from pathlib import Path
from typing import Any, Sequence, Union

__all__ = ["compose_upstream_config"]


def compose_upstream_config(upstream: Union[str, Path], overrides: Sequence[str] = (),
                            config_name: str = "main") -> Any:
    """Compose ``<upstream>/config/<config_name>.yaml`` with Hydra's compose API.

    The plugin's config group (``optimizer/diff3r``, ``# @package diff3r``) is put on the
    search path explicitly, so ``+optimizer=diff3r`` works even where the SearchPathPlugin is
    not discovered.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = (Path(upstream) / "config").resolve()
    if not config_dir.is_dir():
        raise FileNotFoundError(f"{config_dir} does not exist: --upstream must be a repo checkout")
    GlobalHydra.instance().clear()
    overrides = list(overrides)
    if not any(o.startswith("hydra.searchpath") for o in overrides):
        overrides.append("hydra.searchpath=[pkg://diff3r_plugin.configs]")
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


