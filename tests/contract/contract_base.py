"""The bad-input contract every public entry point meets (in the style of kornia's BaseTester).

A test class per entry point derives from :class:`ContractTester` and lists its :class:`Case`
s: one bad input each (a *class* of bad input, sometimes in a few variants) and the outcome
it must end in:

* :class:`Raises`: exactly this error type (not a subclass, not a generic torch error), with a
  phrase of the message that names the problem;
* :class:`Fallback`: a result, with the fallback reported in a field of the result (``info``,
  ``extras``) that ``check`` inspects and, where ``warning`` is set, a warning with that phrase;
* :class:`Exact`: a result that ``check`` compares with an independent reference (e.g. the
  same scene without the extreme value): the input is legal, and the answer must be right.

For every case the harness also checks that no input was modified in place (values and
version counters of every tensor reachable from the inputs) and, for the layer, that no
NaN/Inf leaves the forward or the backward without a message in ``info`` (``check_result``).
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import Tensor

from diff3r_plugin.gaussians.layout import GROUPS, GaussianParams
from diff3r_plugin.layer import ContextViews
from diff3r_plugin.render.api import render_params

F32, F64 = torch.float32, torch.float64
SIZE = 8


# --------------------------------------------------------------------------------------------
# Cases and outcomes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Raises:
    error: type
    match: str
    kind: str = "typed error"


@dataclass(frozen=True)
class Fallback:
    check: Callable[[Any, dict], None]  # (result, inputs) -> None, asserts the reported field
    field: str  # where the fallback is reported, e.g. "info.messages"
    warning: str | None = None  # phrase of the warning that must be emitted
    kind: str = "reported fallback"


@dataclass(frozen=True)
class Exact:
    check: Callable[[Any, dict], None]  # (result, inputs) -> None, compares with a reference
    kind: str = "correct result"


@dataclass(frozen=True)
class Call:
    fn: Callable[..., Any]
    inputs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    klass: str  # the class of bad input
    build: Callable[[], Call]  # fresh inputs for every run
    outcome: Raises | Fallback | Exact
    variant: str = ""

    @property
    def id(self) -> str:
        return f"{self.klass}[{self.variant}]" if self.variant else self.klass


# --------------------------------------------------------------------------------------------
# Input snapshots
# --------------------------------------------------------------------------------------------

def _tensors(obj, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor reachable from ``obj`` (dataclasses, mappings, sequences), by path."""
    out = {}
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.update(_tensors(getattr(obj, f.name), f"{prefix}.{f.name}"))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}[{k!r}]"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}[{i}]"))
    return out


def snapshot(inputs: dict) -> dict[str, tuple[Tensor, Tensor, int]]:
    return {k: (t, t.detach().clone(), t._version) for k, t in _tensors(inputs).items()}


def assert_unchanged(snap: dict) -> None:
    for name, (t, copy, version) in snap.items():
        assert t._version == version, f"input {name} was modified in place"
        assert torch.equal(t.isnan(), copy.isnan()) and torch.equal(
            torch.nan_to_num(t.detach()), torch.nan_to_num(copy)), f"input {name} changed"


# --------------------------------------------------------------------------------------------
# The tester
# --------------------------------------------------------------------------------------------

class ContractTester:
    """Base class: subclasses set ``ENTRY``, ``CASES`` and ``good_call``."""

    ENTRY: str = ""
    CASES: list[Case] = []

    def good_call(self) -> Call:
        raise NotImplementedError

    def check_result(self, result, caught: list) -> None:
        """Entry-specific checks of every result (e.g. no unreported NaN)."""

    def run(self, call: Call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = call.fn(**call.inputs)
        return result, caught

    def test_good_input(self):
        """The valid baseline passes cleanly, so each case's outcome comes from its bad input."""
        call = self.good_call()
        snap = snapshot(call.inputs)
        result, caught = self.run(call)
        self.check_result(result, caught)
        relevant = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert not relevant, [str(w.message) for w in relevant]
        assert_unchanged(snap)

    def test_bad_input(self, case: Case, request):
        call = case.build()
        snap = snapshot(call.inputs)
        outcome = case.outcome
        if isinstance(outcome, Raises):
            with pytest.raises(Exception) as exc:
                self.run(call)
            assert type(exc.value) is outcome.error, (
                f"expected {outcome.error.__name__}, got {type(exc.value).__name__}: {exc.value}")
            assert outcome.match in str(exc.value), str(exc.value)
        else:
            result, caught = self.run(call)
            self.check_result(result, caught)
            outcome.check(result, call.inputs)
            if isinstance(outcome, Fallback) and outcome.warning is not None:
                messages = [str(w.message) for w in caught]
                assert any(outcome.warning in m for m in messages), messages
        assert_unchanged(snap)
        request.node.user_properties.append(("contract", (self.ENTRY, case.klass, outcome.kind)))


# --------------------------------------------------------------------------------------------
# A tiny scene
# --------------------------------------------------------------------------------------------

def cameras(views: int = 2, batch: int = 1, dtype=F64):
    """Cameras on a short sideways line looking down +z (OpenCV c2w, normalized K)."""
    extr = torch.eye(4, dtype=dtype).repeat(batch, views, 1, 1)
    extr[..., 0, 3] = torch.linspace(-0.1, 0.1, views, dtype=dtype)
    k = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]], dtype=dtype)
    intr = k.repeat(batch, views, 1, 1)
    near = torch.full((batch, views), 0.5, dtype=dtype)
    far = torch.full((batch, views), 10.0, dtype=dtype)
    return extr, intr, near, far


def gaussians(num: int = 4, batch: int = 1, dtype=F64, pose_views: int = 0, seed: int = 0,
              sh_degree: int = 0) -> GaussianParams:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    means = torch.stack([0.6 * rnd(batch, num) - 0.3, 0.6 * rnd(batch, num) - 0.3,
                         2.5 + rnd(batch, num)], -1)
    log_scales = torch.log(0.08 + 0.08 * rnd(batch, num, 3))
    quats = torch.randn(batch, num, 4, generator=gen, dtype=F64)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    logits = 0.5 + rnd(batch, num)
    d = (sh_degree + 1) ** 2
    sh = rnd(batch, num, 3, d) - 0.5
    sh[..., 1:] *= 0.2
    pose = torch.zeros(batch, pose_views, 6, dtype=F64)
    p = GaussianParams(means, log_scales, quats, logits, sh[..., :1], sh[..., 1:], pose)
    return p.map(lambda t: t.to(dtype).contiguous())


def views(batch: int = 1, dtype=F64, num_views: int = 2, **overrides) -> ContextViews:
    extr, intr, near, far = cameras(num_views, batch, dtype)
    target = gaussians(4, batch, dtype, seed=1)
    images = render_params(target, extr, intr, near, far, (SIZE, SIZE)).color.clamp(0, 1)
    fields = dict(images=images, extrinsics=extr, intrinsics=intr, near=near, far=far)
    fields.update(overrides)
    return ContextViews(**fields)


def lambda_for(layout, batch: int = 1, dtype=F64, value: float = 0.5) -> Tensor:
    return layout.per_group({g: value for g in GROUPS}, batch=batch, dtype=dtype)


def all_finite(*ts) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in ts)


def close(a: Tensor, b: Tensor, rtol: float) -> bool:
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= rtol * scale and math.isfinite(float(a.abs().max()))
