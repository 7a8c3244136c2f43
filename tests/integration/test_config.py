"""Tests of the typed plugin config ``diff3r_plugin.config.Diff3RConfig``."""

import dataclasses
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml
from omegaconf import OmegaConf

from diff3r_plugin.config import Diff3RConfig, HeadConfig, LearningRates, load_from_hydra
from diff3r_plugin.errors import ConfigError

YAML_PATH = Path(__file__).resolve().parents[2] / "configs" / "optimizer" / "diff3r.yaml"


def test_defaults() -> None:
    cfg = Diff3RConfig()
    assert cfg.enabled is True and cfg.adapter == "auto"
    assert cfg.steps == 2 and cfg.inner_solver == "lm" and cfg.stationarity_tol == 1e-4
    assert cfg.lr == LearningRates(
        means=1.6e-4, log_scales=5e-3, quats=1e-3, opacity_logits=5e-2, sh_dc=2.5e-3, sh_rest=1.25e-4, pose=1e-3
    )
    assert cfg.means_lr_scale == "scene_extent"
    assert (cfg.lm_damping, cfg.lm_pcg_iters, cfg.lm_pcg_tol) == (3.0, 5, 1e-2)
    assert (cfg.backward, cfg.matvec, cfg.fd_eps) == ("implicit", "sparse", 1e-3)
    assert (cfg.precond, cfg.precond_probes) == ("block_jacobi", 8)
    assert (cfg.pcg_tol, cfg.pcg_maxiter, cfg.pcg_check_every) == (1e-3, 10, 5)
    assert (cfg.robust, cfg.huber_delta, cfg.on_failure) == ("none", 0.1, "warn")
    assert (cfg.backend, cfg.sh_basis) == ("torch", "auto")
    assert (cfg.lambda_mode, cfg.constant_lambda) == ("predicted", 1.0)
    assert cfg.head == HeadConfig(granularity="group", floor=1e-4, init=1.0, hidden=32)
    assert cfg.progress is False and cfg.optimize_pose is True
    # from_dict of nothing is the default, and to_dict round-trips through plain dicts.
    assert Diff3RConfig.from_dict({}) == cfg == Diff3RConfig.from_dict(None)
    d = cfg.to_dict()
    assert type(d) is dict and type(d["lr"]) is dict and type(d["head"]) is dict
    assert Diff3RConfig.from_dict(d) == cfg


def test_yaml_equals_defaults() -> None:
    """The shipped option file and the dataclass must never drift apart."""
    text = YAML_PATH.read_text()
    assert text.splitlines()[0] == "# @package diff3r"
    data = yaml.safe_load(text)
    # The defaults list (Hydra strips it from the composed node) pulls in the callback entry.
    assert data.pop("defaults") == ["/diff3r_hydra/callbacks@_global_", "_self_"]
    assert Diff3RConfig.from_dict(data) == Diff3RConfig()
    # Every field is spelled out in the yaml (not just "defaults happen to match").
    assert data == Diff3RConfig().to_dict()
    # Same through OmegaConf's own YAML loader, which is what Hydra uses.
    loaded = OmegaConf.load(YAML_PATH)
    loaded.pop("defaults")
    assert Diff3RConfig.from_dict(loaded) == Diff3RConfig()


@pytest.mark.parametrize(
    "mapping, key, suggestion",
    [
        ({"stpes": 3}, "diff3r.stpes", "diff3r.steps"),
        ({"lr": {"mean": 1e-3}}, "diff3r.lr.mean", "diff3r.lr.means"),
        ({"head": {"hiden": 8}}, "diff3r.head.hiden", "diff3r.head.hidden"),
    ],
)
def test_unknown_key_suggests_close_match(mapping: Dict[str, Any], key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        Diff3RConfig.from_dict(mapping)
    msg = str(info.value)
    assert repr(key) in msg and f"Did you mean {suggestion!r}" in msg


def test_unknown_key_uses_given_path() -> None:
    with pytest.raises(ConfigError, match=r"'tto\.stpes'.*'tto\.steps'"):
        Diff3RConfig.from_dict({"stpes": 3}, path="tto")


@pytest.mark.parametrize(
    "mapping, key, value, allowed",
    [
        ({"steps": "5"}, "diff3r.steps", "'5'", "an int >= 0"),
        ({"steps": True}, "diff3r.steps", "True", "an int >= 0"),  # bool is not an int
        ({"steps": 2.0}, "diff3r.steps", "2.0", "an int >= 0"),
        ({"progress": "false"}, "diff3r.progress", "'false'", "a bool"),
        ({"fd_eps": "1e-3"}, "diff3r.fd_eps", "'1e-3'", "a float > 0"),
        ({"inner_solver": "sgd"}, "diff3r.inner_solver", "'sgd'", "one of 'adam', 'lm'"),
        ({"adapter": 3}, "diff3r.adapter", "3", "a string"),
        ({"lr": 0.1}, "diff3r.lr", "0.1", "a mapping"),
        ({"head": {"granularity": "per_gaussian"}}, "diff3r.head.granularity", "'per_gaussian'", "'group', 'parameter'"),
    ],
)
def test_wrong_type(mapping: Dict[str, Any], key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        Diff3RConfig.from_dict(mapping)
    msg = str(info.value)
    assert key in msg and value in msg and allowed in msg


def test_literal_typo_suggests_choice() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'implicit'"):
        Diff3RConfig.from_dict({"backward": "implict"})


@pytest.mark.parametrize(
    "mapping, key, allowed",
    [
        ({"steps": -1}, "diff3r.steps", ">= 0"),
        ({"stationarity_tol": -1e-9}, "diff3r.stationarity_tol", ">= 0"),
        ({"lm_damping": 0}, "diff3r.lm_damping", "> 0"),
        ({"lm_pcg_iters": 0}, "diff3r.lm_pcg_iters", ">= 1"),
        ({"pcg_tol": 1.0}, "diff3r.pcg_tol", "> 0 and < 1"),
        ({"pcg_tol": 0.0}, "diff3r.pcg_tol", "> 0 and < 1"),
        ({"pcg_maxiter": 0}, "diff3r.pcg_maxiter", ">= 1"),
        ({"precond_probes": 0}, "diff3r.precond_probes", ">= 1"),
        ({"pcg_check_every": 0}, "diff3r.pcg_check_every", ">= 1"),
        ({"huber_delta": -0.1}, "diff3r.huber_delta", "> 0"),
        ({"constant_lambda": 0}, "diff3r.constant_lambda", "> 0"),
        ({"lr": {"pose": 0.0}}, "diff3r.lr.pose", "> 0"),
        ({"head": {"hidden": 0}}, "diff3r.head.hidden", ">= 1"),
        ({"head": {"floor": 0.0}}, "diff3r.head.floor", "> 0"),
        ({"head": {"floor": 0.5, "init": 0.5}}, "diff3r.head.init", "> diff3r.head.floor"),
        ({"fd_eps": float("nan")}, "diff3r.fd_eps", "finite"),
    ],
)
def test_out_of_range(mapping: Dict[str, Any], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        Diff3RConfig.from_dict(mapping)
    msg = str(info.value)
    assert key in msg and allowed in msg


def test_ints_accepted_for_floats() -> None:
    cfg = Diff3RConfig.from_dict({"fd_eps": 1, "lr": {"means": 1}, "head": {"init": 2}})
    assert cfg.fd_eps == 1.0 and type(cfg.fd_eps) is float
    assert type(cfg.lr.means) is float and type(cfg.head.init) is float


def test_nested_override_keeps_siblings() -> None:
    cfg = Diff3RConfig.from_dict({"steps": 7, "lr": {"means": 3e-4}, "head": {"granularity": "parameter"}})
    assert cfg.steps == 7
    assert cfg.lr == dataclasses.replace(LearningRates(), means=3e-4)
    assert cfg.head == dataclasses.replace(HeadConfig(), granularity="parameter")
    merged = cfg.merge({"head": {"floor": 1e-3}})
    assert merged.head.floor == 1e-3 and merged.head.granularity == "parameter" and merged.steps == 7
    assert cfg.head.floor == 1e-4  # merge returns a copy


def test_direct_construction_is_validated_and_frozen() -> None:
    with pytest.raises(ConfigError, match="diff3r.steps"):
        Diff3RConfig(steps=-1)
    with pytest.raises(ConfigError, match="diff3r.steps"):
        dataclasses.replace(Diff3RConfig(), steps=-1)
    with pytest.raises(ConfigError, match=r"diff3r\.head\.init"):
        HeadConfig(floor=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Diff3RConfig().steps = 3  # type: ignore[misc]


def test_dictconfig_input() -> None:
    node = OmegaConf.create(
        {"base_steps": 9, "diff3r": {"steps": "${base_steps}", "inner_solver": "adam", "lr": {"pose": 2e-3}}}
    )
    OmegaConf.set_struct(node, True)  # Hydra composes in struct mode
    cfg = Diff3RConfig.from_dict(node.diff3r)
    assert cfg.steps == 9 and cfg.inner_solver == "adam" and cfg.lr.pose == 2e-3
    assert load_from_hydra(node) == cfg
    bad = OmegaConf.create({"diff3r": {"steps": "${nowhere}"}})
    with pytest.raises(ConfigError, match="diff3r"):
        load_from_hydra(bad)
    missing = OmegaConf.create({"diff3r": {"steps": "???"}})
    with pytest.raises(ConfigError, match=r"diff3r\.steps is missing"):
        load_from_hydra(missing)


def test_load_from_hydra_absent_and_misuse() -> None:
    assert load_from_hydra(OmegaConf.create({"optimizer": {"lr": 2e-4}})) is None
    assert load_from_hydra({"optimizer": {"lr": 2e-4}}) is None
    assert load_from_hydra({"diff3r": {"steps": 3}}) == Diff3RConfig(steps=3)
    # `optimizer=diff3r` replaces the TRAINING optimizer with a string: point to the right way.
    with pytest.raises(ConfigError, match=r"defaults list"):
        load_from_hydra(OmegaConf.create({"optimizer": "diff3r"}))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_from_hydra({"diff3r": 5})
