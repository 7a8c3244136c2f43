"""Wall-clock time of the named parts of a training step.

The layer and the training code mark their parts with ``with part("name"):``. Nothing is
measured unless a recorder is active, so the marks cost one global lookup in normal use.
``diff3r bench step`` opens a recorder around one outer step::

    with record_parts(sync=torch.cuda.synchronize) as times:
        loss = step(batch)
        loss.backward()
    times.ms       # {"encoder": ..., "tto_forward": ..., ...}: exclusive milliseconds

Parts nest: the time of an inner part is taken out of the part around it, so the parts of one
step never overlap and, with ``rest = total - sum(parts)``, they add up to the total.
"""

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

__all__ = ["PartTimes", "part", "record_parts", "recording"]


@dataclass
class PartTimes:
    """Exclusive seconds and entry counts of each named part."""

    seconds: dict = field(default_factory=lambda: defaultdict(float))
    counts: dict = field(default_factory=lambda: defaultdict(int))

    @property
    def ms(self) -> dict:
        return {name: 1e3 * s for name, s in self.seconds.items()}


class _Recorder:
    def __init__(self, sync: Optional[Callable[[], None]]):
        self.times = PartTimes()
        self.sync = sync
        # Stack of [name, start of the running (not paused) interval].
        self.stack: list = []

    def _now(self) -> float:
        if self.sync is not None:
            # Asynchronous devices: charge queued kernels to the part that launched them.
            self.sync()
        return time.perf_counter()

    def enter(self, name: str) -> None:
        now = self._now()
        if self.stack:
            outer = self.stack[-1]
            self.times.seconds[outer[0]] += now - outer[1]
        self.stack.append([name, now])
        self.times.counts[name] += 1

    def exit(self) -> None:
        now = self._now()
        name, start = self.stack.pop()
        self.times.seconds[name] += now - start
        if self.stack:
            self.stack[-1][1] = now


_active: Optional[_Recorder] = None


def recording() -> bool:
    """True while a recorder is active (callers may then add host syncs they would skip)."""
    return _active is not None


@contextlib.contextmanager
def part(name: str) -> Iterator[None]:
    """Charge the time spent inside this block (minus nested parts) to ``name``."""
    recorder = _active
    if recorder is None:
        yield
        return
    recorder.enter(name)
    try:
        yield
    finally:
        recorder.exit()


@contextlib.contextmanager
def record_parts(sync: Optional[Callable[[], None]] = None) -> Iterator[PartTimes]:
    """Activate a recorder for the block; yields the :class:`PartTimes` it fills in."""
    global _active
    if _active is not None:
        raise RuntimeError("record_parts() is already active; recorders do not nest")
    recorder = _Recorder(sync)
    _active = recorder
    try:
        yield recorder.times
    finally:
        _active = None
