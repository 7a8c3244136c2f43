"""Timing and memory helpers for the benchmarks."""

import os
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Extra memory (MB) allocated while the block runs, above the level when it started.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM), reset
    on entry through ``/proc/self/clear_refs``; run with ``MALLOC_MMAP_THRESHOLD_`` low (the
    benchmark sets it for its worker processes) so that freed tensors go back to the OS and
    the resident set follows live tensors.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
            self._start = (_read_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_read_status_kb("VmHWM") or 0) * 1024
        self.peak_mb = max(peak - self._start, 0) / 2**20


def low_mmap_env() -> dict[str, str]:
    """Environment for a worker whose resident set should follow its live tensors: glibc
    serves every allocation above 64 KiB by its own mmap and unmaps it when freed. Those
    mappings are advised for transparent huge pages (``glibc.malloc.hugetlb=1``, glibc >= 2.35;
    ignored elsewhere): cheaper page faults for freshly mapped tensors (one energy and gradient
    of the 4096-Gaussian layer benchmark: about 255 ms without, 215 ms with), and the same
    measured peaks, since a tensor fills the pages it maps."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, "glibc.malloc.hugetlb=1") if t)
    return env


def bench_main(add_arguments: Callable, run: Callable, worker: Callable) -> None:
    """``python -m diff3r_plugin.bench.<name>``: the bench's own worker processes (``--worker``,
    one JSON line for the parent) or one run (indented JSON)."""
    import argparse
    import json

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    a = parser.parse_args()
    print(json.dumps(worker(a)) if a.worker else json.dumps(run(a), indent=2))
