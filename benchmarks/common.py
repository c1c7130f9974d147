"""What every benchmark script here shares (they run as `python benchmarks/<script>.py`, so this
module is importable as `common`)."""

from __future__ import annotations

import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version

_T0 = time.perf_counter()


def pkg_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for a CPU benchmark's record."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def progress(msg: str) -> None:
    """One timestamped line as each step ends: a run cut off by a time limit still shows where it was."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b||, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def wall_us(fn, calls: int = 200, repeats: int = 5, warmup: int = 10) -> float:
    """Host wall time per call of `fn` in us: the median over `repeats` loops of `calls` calls, each loop
    between two CUDA syncs (so launch overhead that the GPU cannot hide shows)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per)
