"""Parametrizes every :class:`ContractTester` over its cases and prints how they end."""

from collections import Counter

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one torch thread (``tests/conftest.py``)."""
    yield


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and metafunc.cls is not None:
        cases = metafunc.cls.CASES
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_terminal_summary(terminalreporter):
    rows = [dict(r.user_properties).get("contract") for r in terminalreporter.stats.get("passed", [])]
    rows = [r for r in rows if r is not None]
    if not rows:
        return
    failed = [r for r in terminalreporter.stats.get("failed", []) if "test_bad_input" in r.nodeid]
    classes, distinct = {}, {}
    for entry, klass, kind in rows:
        classes.setdefault((entry, klass), set()).add(kind)
        distinct.setdefault(klass, set()).add(kind)
    by_kind = Counter(kind for _, _, kind in rows)
    class_kind = Counter(" / ".join(sorted(kinds)) for kinds in distinct.values())
    entries = sorted({entry for entry, _, _ in rows})
    tr = terminalreporter
    tr.section("bad-input contract")
    tr.write_line(f"entry points: {len(entries)} ({', '.join(entries)})")
    tr.write_line(f"classes of bad input: {len(distinct)}; (entry point, class) pairs: {len(classes)}; "
                  f"cases passed: {len(rows)}; contract cases failed: {len(failed)}")
    tr.write_line("cases by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    tr.write_line("classes by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(class_kind.items())))
