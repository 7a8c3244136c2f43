import time

import pytest

from diff3r_plugin.profiling import part, record_parts, recording


def test_nested_parts_are_exclusive_and_add_up():
    t0 = time.perf_counter()
    with record_parts() as times:
        with part("outer"):
            time.sleep(0.02)
            with part("inner"):
                time.sleep(0.03)
            with part("inner"):
                time.sleep(0.03)
    total = time.perf_counter() - t0
    assert times.counts == {"outer": 1, "inner": 2}
    assert times.seconds["inner"] == pytest.approx(0.06, abs=0.03)
    assert times.seconds["outer"] == pytest.approx(0.02, abs=0.03)
    assert times.seconds["inner"] > times.seconds["outer"]
    assert sum(times.seconds.values()) <= total + 1e-6


def test_parts_cost_nothing_without_recorder():
    assert not recording()
    with part("x"):
        pass
    with record_parts():
        assert recording()
        with pytest.raises(RuntimeError, match="already active"):
            with record_parts():
                pass
    assert not recording()
