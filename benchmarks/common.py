"""What every benchmark script here shares (they run as `python benchmarks/<script>.py`, so this
module is importable as `common`)."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

_T0 = time.perf_counter()


def pkg_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def progress(msg: str) -> None:
    """One timestamped line as each step ends: a run cut off by a time limit still shows where it was."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b||, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
