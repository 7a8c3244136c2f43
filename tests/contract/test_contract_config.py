"""Bad-input contract of the configuration, the uncertainty head and the adapter registry."""

import dataclasses
import math

import torch
from contract_base import Call, Case, ContractTester, Raises

from diff3r_plugin.adapters.registry import get_adapter, register_adapter
from diff3r_plugin.config import Diff3RConfig, HeadConfig
from diff3r_plugin.errors import ConfigError, ShapeError, UnknownAdapterError
from diff3r_plugin.layer import Diff3RLayer
from diff3r_plugin.uncertainty.head import UncertaintyHead


def make(factory, *args, **kw):
    return lambda: Call(lambda: factory(*args, **kw))


class TestDiff3RConfig(ContractTester):
    ENTRY = "Diff3RConfig"
    CASES = [
        Case("misspelt key", make(Diff3RConfig, stepz=5), Raises(ConfigError, "Did you mean 'diff3r.steps'"),
             "constructor"),
        Case("misspelt key", make(Diff3RConfig.from_dict, {"stepz": 5}), Raises(ConfigError, "Did you mean 'diff3r.steps'"),
             "from_dict"),
        Case("misspelt key", make(Diff3RConfig().merge, {"head": {"flor": 1e-3}}),
             Raises(ConfigError, "Did you mean 'diff3r.head.floor'"), "merge, nested"),
        Case("misspelt key", make(dataclasses.replace, Diff3RConfig(), stepz=5),
             Raises(ConfigError, "Did you mean 'diff3r.steps'"), "dataclasses.replace"),
        Case("misspelt key", make(Diff3RLayer, stepz=5), Raises(ConfigError, "Did you mean 'diff3r.steps'"),
             "Diff3RLayer overrides"),
        Case("misspelt choice", make(Diff3RConfig, inner_solver="adma"), Raises(ConfigError, "Did you mean 'adam'")),
        Case("out-of-range value", make(Diff3RConfig, steps=-1), Raises(ConfigError, ">= 0")),
        Case("bool for an int", make(Diff3RConfig, steps=True), Raises(ConfigError, "(bool)")),
        Case("non-finite float", make(Diff3RConfig, pcg_tol=math.nan), Raises(ConfigError, "finite")),
        Case("string for a bool", make(Diff3RConfig, progress="false"), Raises(ConfigError, "a bool")),
        Case("section that is not a mapping", make(Diff3RConfig.from_dict, {"lr": 3}), Raises(ConfigError, "mapping")),
        Case("head floor 0", make(HeadConfig, floor=0.0), Raises(ConfigError, "> 0"), "HeadConfig"),
        Case("head init <= floor", make(HeadConfig, floor=1.0, init=0.5), Raises(ConfigError, "init must be >")),
    ]

    def good_call(self) -> Call:
        return make(Diff3RConfig, steps=5, head={"floor": 1e-3})()


class TestUncertaintyHead(ContractTester):
    ENTRY = "UncertaintyHead"
    CASES = [
        Case("head floor 0", make(UncertaintyHead, 14, 0, floor=0.0), Raises(ConfigError, "floor must be > 0")),
        Case("head init <= floor", make(UncertaintyHead, 14, 0, floor=1.0, init=1.0), Raises(ConfigError, "init")),
        Case("unknown granularity", make(UncertaintyHead, 14, 0, granularity="gaussian"),
             Raises(ConfigError, "granularity")),
        Case("non-finite float", make(UncertaintyHead, 14, 0, init=math.inf), Raises(ConfigError, "finite")),
        Case("features of the wrong shape", lambda: Call(lambda: UncertaintyHead(14, 0)(torch.zeros(1, 4, 13))),
             Raises(ShapeError, "features must be")),
    ]

    def good_call(self) -> Call:
        return Call(lambda: UncertaintyHead(14, 0)(torch.zeros(1, 4, 14)))


class TestAdapterRegistry(ContractTester):
    ENTRY = "adapter registry"
    CASES = [
        Case("misspelt adapter", make(get_adapter, "mvspalt"), Raises(UnknownAdapterError, "Did you mean 'mvsplat'")),
        Case("adapter name not a string", make(get_adapter, 3), Raises(UnknownAdapterError, "Unknown adapter 3")),
        Case("empty adapter name", make(register_adapter, ""), Raises(ConfigError, "non-empty string")),
        Case("reserved adapter name", make(register_adapter, "auto"), Raises(ConfigError, "reserved")),
        Case("adapter that is not callable", lambda: Call(lambda: register_adapter("contract_probe")(3)),
             Raises(ConfigError, "class or factory")),
    ]

    def good_call(self) -> Call:
        return make(get_adapter, "mvsplat")()
