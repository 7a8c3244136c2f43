"""The environment of the layer benchmark's workers (memory measurement by resident set)."""

from diff3r_plugin.bench.timing import low_mmap_env


def test_worker_env_maps_large_allocations_and_advises_huge_pages(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = low_mmap_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_worker_env_keeps_the_callers_settings(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    env = low_mmap_env()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert low_mmap_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
