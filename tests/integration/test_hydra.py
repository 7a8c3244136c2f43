"""Hydra integration: the ``optimizer/diff3r`` option in an upstream-shaped config tree.

The config tree built here mirrors MVSplat's ``config/main.yaml`` (see UPSTREAM.md §4): the
top-level ``optimizer`` node is the *training* optimizer and must survive untouched, while the
plugin's settings land at the top-level ``diff3r`` key through the ``# @package diff3r`` header.
Composition uses ``initialize_config_dir`` + ``compose``, which composes like ``@hydra.main``.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from diff3r_plugin.config import Diff3RConfig, load_from_hydra
from diff3r_plugin.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_MODULE = "hydra_plugins.diff3r_searchpath.diff3r_searchpath"
TRAINING_OPTIMIZER = {"lr": 2.0e-4, "warm_up_steps": 2000, "cosine_lr": True}

MAIN_DEFAULTS = """\
defaults:
  - dataset: re10k
  - model/encoder: costvolume
  - model/decoder: splatting_cuda
  - loss: [mse]
"""

MAIN_BODY = """\

wandb:
  project: mvsplat
  entity: placeholder
  mode: disabled

mode: train

dataset:
  overfit_to_scene: null

data_loader:
  train:
    num_workers: 10
    batch_size: 4

optimizer:
  lr: 2.0e-4
  warm_up_steps: 2000
  cosine_lr: true

checkpointing:
  load: null
  every_n_train_steps: 5000

train:
  depth_mode: null
  extended_visualization: false
  print_log_every_n_steps: 1

test:
  output_path: outputs/test
  compute_scores: false

seed: 111123
"""

GROUP_FILES = {
    "dataset/re10k.yaml": "name: re10k\nroots: [datasets/re10k]\nimage_shape: [256, 256]\n",
    "model/encoder/costvolume.yaml": "name: costvolume\nd_feature: 128\nnum_depth_candidates: 32\n",
    "model/decoder/splatting_cuda.yaml": "name: splatting_cuda\n",
    "loss/mse.yaml": "mse:\n  weight: 1.0\n",
}


def _write_tree(root: Path, extra_defaults: str = "") -> Path:
    """Writes an MVSplat-shaped ``config/`` tree under ``root`` and returns its path."""
    config_dir = root / "config"
    for rel, text in GROUP_FILES.items():
        path = config_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (config_dir / "main.yaml").write_text(MAIN_DEFAULTS + extra_defaults + MAIN_BODY)
    return config_dir


@pytest.fixture
def upstream_dir(tmp_path: Path) -> Path:
    """Upstream config tree whose main.yaml does not mention the plugin."""
    return _write_tree(tmp_path / "plain")


@pytest.fixture
def upstream_dir_with_default(tmp_path: Path) -> Path:
    """Upstream config tree with ``- optimizer: diff3r`` added to the defaults list."""
    return _write_tree(tmp_path / "with_default", extra_defaults="  - optimizer: diff3r\n")


def _compose(config_dir: Path, overrides: List[str]) -> DictConfig:
    """Composes ``main`` like ``@hydra.main(version_base=None, config_path=..., config_name="main")``."""
    with warnings.catch_warnings():
        # Upstream main.yaml has no `_self_` in its defaults list; Hydra warns about that.
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name="main", overrides=overrides)


@pytest.fixture(scope="module")
def plugin_in_process() -> Iterator[None]:
    """Fails early, with the reason, when Hydra cannot see the SearchPathPlugin in this process.

    ``python -m pytest`` from the repo root puts the root on sys.path, which makes the
    namespace enumerable even under an editable install; plain ``pytest`` does not.
    """
    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(SearchPathPlugin)]
    if not any(n.startswith(PLUGIN_MODULE) for n in names):
        import hydra_plugins

        pytest.fail(
            f"Hydra did not discover {PLUGIN_MODULE} (found {names}; hydra_plugins.__path__="
            f"{list(hydra_plugins.__path__)}). With a setuptools PEP 660 editable install the "
            "hydra_plugins namespace is not enumerable unless the repo root is on sys.path; see "
            "test_plugin_discovered_outside_source_tree. Run `python -m pytest` from the repo root "
            "or list 'hydra_plugins' in [tool.setuptools] packages and reinstall."
        )
    yield


in_process = pytest.mark.usefixtures("plugin_in_process")


def _assert_plugin_and_training_optimizer(cfg: DictConfig) -> None:
    """The two invariants of every successful composition."""
    assert OmegaConf.to_container(cfg.optimizer) == TRAINING_OPTIMIZER
    assert OmegaConf.to_container(cfg.diff3r) == Diff3RConfig().to_dict()
    assert load_from_hydra(cfg) == Diff3RConfig()
    # Upstream groups still compose as before.
    assert cfg.model.encoder.name == "costvolume" and cfg.model.decoder.name == "splatting_cuda"
    assert cfg.dataset.name == "re10k" and cfg.loss.mse.weight == 1.0
    assert cfg.train.print_log_every_n_steps == 1 and cfg.test.output_path == "outputs/test"


@in_process
def test_without_plugin_selected_there_is_no_diff3r_node(upstream_dir: Path) -> None:
    cfg = _compose(upstream_dir, [])
    assert "diff3r" not in cfg
    assert OmegaConf.to_container(cfg.optimizer) == TRAINING_OPTIMIZER
    assert load_from_hydra(cfg) is None


@in_process
def test_a_cli_append_keeps_training_optimizer(upstream_dir: Path) -> None:
    cfg = _compose(upstream_dir, ["+optimizer=diff3r"])
    _assert_plugin_and_training_optimizer(cfg)


@in_process
def test_b_defaults_list_entry(upstream_dir_with_default: Path) -> None:
    cfg = _compose(upstream_dir_with_default, [])
    _assert_plugin_and_training_optimizer(cfg)
    # Once the defaults list has the entry, the plain CLI group override works too.
    cfg2 = _compose(upstream_dir_with_default, ["optimizer=diff3r"])
    _assert_plugin_and_training_optimizer(cfg2)


@in_process
@pytest.mark.parametrize(
    "which, overrides, expected",
    [
        ("plain", ["+optimizer=diff3r", "diff3r.steps=50"], {"steps": 50}),
        ("plain", ["+optimizer=diff3r", "diff3r.inner_solver=adam"], {"inner_solver": "adam"}),
        (
            "plain",
            ["+optimizer=diff3r", "diff3r.lr.means=3e-4", "diff3r.head.granularity=parameter"],
            {"lr": {"means": 3e-4}, "head": {"granularity": "parameter"}},
        ),
        ("default", ["diff3r.steps=50", "diff3r.backward=unroll"], {"steps": 50, "backward": "unroll"}),
    ],
)
def test_c_overrides_land_in_typed_config(
    upstream_dir: Path, upstream_dir_with_default: Path, which: str, overrides: List[str], expected: Dict[str, Any]
) -> None:
    cfg = _compose(upstream_dir if which == "plain" else upstream_dir_with_default, overrides)
    assert OmegaConf.to_container(cfg.optimizer) == TRAINING_OPTIMIZER
    assert load_from_hydra(cfg) == Diff3RConfig().merge(expected)


@in_process
def test_d_bad_value_composes_but_typed_load_fails(upstream_dir: Path) -> None:
    cfg = _compose(upstream_dir, ["+optimizer=diff3r", "diff3r.inner_solver=sgd"])
    assert cfg.diff3r.inner_solver == "sgd"  # Hydra itself does not know the allowed values
    with pytest.raises(ConfigError) as info:
        load_from_hydra(cfg)
    assert "diff3r.inner_solver" in str(info.value) and "'adam', 'lm'" in str(info.value)


@in_process
def test_d_unknown_key(upstream_dir: Path) -> None:
    # Without '+' Hydra's struct mode already rejects a key the yaml does not define...
    with pytest.raises(Exception, match="stpes"):
        _compose(upstream_dir, ["+optimizer=diff3r", "diff3r.stpes=3"])
    # ...and with '+' it composes, so the typed load must catch it.
    cfg = _compose(upstream_dir, ["+optimizer=diff3r", "+diff3r.stpes=3"])
    with pytest.raises(ConfigError, match=r"'diff3r\.stpes'.*Did you mean 'diff3r\.steps'"):
        load_from_hydra(cfg)


# Child-process code for (e). Hydra's plugin scanner loads modules through
# `importer.find_spec(...)` on the path entry finder, which bypasses sys.meta_path, so a
# meta-path blocker alone does NOT hide the plugin (it only blocks ordinary imports). The
# `sys.modules[...] = None` sentinel covers the scanner: it skips modules whose sys.modules
# entry is None, and pkgutil cannot descend into a package that fails to import.
_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings
    config_dir, overrides, block = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
    BLOCKED = "hydra_plugins.diff3r_searchpath"

    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == BLOCKED or name.startswith(BLOCKED + "."):
                raise ModuleNotFoundError("blocked for the test: " + name, name=name)
            return None

    if block:
        sys.meta_path.insert(0, _Blocker())
        sys.modules[BLOCKED] = None
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin
    warnings.simplefilter("ignore")
    out = {"plugins": [c.__module__ for c in Plugins.instance().discover(SearchPathPlugin)]}
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name="main", overrides=overrides)
        out["ok"] = True
        out["has_diff3r"] = "diff3r" in cfg
    except Exception as exc:
        out["ok"] = False
        out["error_type"] = type(exc).__name__
        out["error"] = str(exc)
    print(json.dumps(out))
    """
)


def _run_child(config_dir: Path, overrides: List[str], block: bool) -> Dict[str, Any]:
    """Composes in a fresh interpreter (Hydra's plugin registry is a per-process singleton)."""
    # The repo root goes first on sys.path so the control run finds the plugin whatever the
    # install mode (see test_plugin_discovered_outside_source_tree for the install itself).
    entries = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(entries))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(config_dir), json.dumps(overrides), "1" if block else "0"],
        capture_output=True, text=True, env=env, cwd=str(config_dir), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_e_without_plugin_group_is_missing(upstream_dir: Path, upstream_dir_with_default: Path) -> None:
    # Control: same child code, nothing blocked -> the plugin is found and composition works.
    control = _run_child(upstream_dir, ["+optimizer=diff3r"], block=False)
    assert PLUGIN_MODULE in control["plugins"] and control["ok"] and control["has_diff3r"], control

    # Defaults-list entry, plugin hidden: Hydra's MissingConfigException names optimizer/diff3r.
    res = _run_child(upstream_dir_with_default, [], block=True)
    assert PLUGIN_MODULE not in res["plugins"], res
    assert not res["ok"] and res["error_type"] == "MissingConfigException", res
    assert "optimizer/diff3r" in res["error"], res

    # CLI `+optimizer=diff3r`, plugin hidden: there is no `optimizer` group, so Hydra treats it
    # as appending a *value* and collides with the training optimizer (UPSTREAM.md §4 table).
    res = _run_child(upstream_dir, ["+optimizer=diff3r"], block=True)
    assert not res["ok"] and res["error_type"] == "ConfigCompositionException", res
    assert "already at 'optimizer'" in res["error"], res


def test_plugin_discovered_outside_source_tree(tmp_path: Path) -> None:
    """Discovery as a user sees it: the installed distribution only, cwd outside the repo."""
    code = textwrap.dedent(
        """
        import json, os, sys
        from hydra.core.plugins import Plugins
        from hydra.plugins.search_path_plugin import SearchPathPlugin
        import hydra_plugins
        print(json.dumps({
            "plugins": [c.__module__ for c in Plugins.instance().discover(SearchPathPlugin)],
            "path": [str(p) for p in hydra_plugins.__path__],
            "sys_path": sys.path,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(Path(p).resolve() == REPO_ROOT for p in res["sys_path"] if p), res["sys_path"]
    # setuptools' PEP 660 editable finder hides a namespace package from pkgutil unless
    # "hydra_plugins" is listed in [tool.setuptools] packages (facebookresearch/hydra#2359);
    # pyproject.toml lists it, so the plugin must be found in every install mode.
    assert PLUGIN_MODULE in res["plugins"], res


def _compose_with_hydra(config_dir: Path, overrides: List[str]) -> DictConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name="main", overrides=overrides, return_hydra_config=True)


CALLBACK_TARGET = "diff3r_plugin.integration.hydra_callback.Diff3RCallback"


@in_process
def test_option_registers_callback_next_to_user_callbacks(upstream_dir: Path, upstream_dir_with_default: Path) -> None:
    cfg = _compose_with_hydra(upstream_dir, ["+optimizer=diff3r", "+hydra.callbacks.mine._target_=my.Callback"])
    callbacks = OmegaConf.to_container(cfg.hydra.callbacks)
    assert callbacks["diff3r"]["_target_"] == CALLBACK_TARGET
    assert callbacks["mine"] == {"_target_": "my.Callback"}
    _assert_plugin_and_training_optimizer(cfg)
    # The defaults-list line registers it as well; without the plugin selected there is none.
    cfg = _compose_with_hydra(upstream_dir_with_default, [])
    assert cfg.hydra.callbacks.diff3r._target_ == CALLBACK_TARGET
    assert "diff3r" not in (_compose_with_hydra(upstream_dir, []).hydra.callbacks or {})
