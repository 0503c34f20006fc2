"""Small helpers shared by the benchmark scripts: percentiles, ratio tables, CPU per thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) by linear interpolation (numpy's default); raises on no values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction}")
    return float(np.quantile(values, fraction, method="linear"))


@dataclass(frozen=True)
class Summary:
    """Latency summary in milliseconds."""

    label: str
    count: int
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, label: str, seconds: Sequence[float]) -> Summary:
        return cls(label, len(seconds), percentile(seconds, 0.5) * 1e3, percentile(seconds, 0.99) * 1e3)


def ratio(ours: float, baseline: float) -> str:
    """``ours / baseline`` formatted as ``1.23x`` (``n/a`` when the baseline is zero)."""
    return f"{ours / baseline:.2f}x" if baseline > 0 else "n/a"


def print_comparison(title: str, baseline: Summary, ours: Summary) -> None:
    """Print two summaries and the ours/baseline ratios for p50 and p99."""
    print(f"\n{title}")
    print(f"  {'':28} {'n':>6} {'p50 ms':>9} {'p99 ms':>9}")
    for row in (baseline, ours):
        print(f"  {row.label:28} {row.count:>6} {row.p50_ms:>9.3f} {row.p99_ms:>9.3f}")
    print(f"  {'ratio ours/' + baseline.label:28} {'':>6} {ratio(ours.p50_ms, baseline.p50_ms):>9}"
          f" {ratio(ours.p99_ms, baseline.p99_ms):>9}")


class ThreadCpu:
    """CPU seconds of this process's threads, grouped by ``side(thread name)``: a snapshot, then the
    difference (threads whose side is None are left out).

    Reads each live thread's own CPU clock (``pthread_getcpuclockid``), so the time the benchmark's
    bookkeeping spends in other threads does not count, and neither does the broker (a subprocess).
    A thread that ends between the two snapshots is missed; one that starts is counted from zero.
    """

    def __init__(self, side: Callable[[str], str | None]) -> None:
        self._side = side
        self._start = self._read()

    @staticmethod
    def _read() -> dict[int, tuple[str, float]]:
        seen: dict[int, tuple[str, float]] = {}
        for thread in threading.enumerate():
            ident = thread.ident
            if ident is None:
                continue
            try:
                seen[ident] = (thread.name, time.clock_gettime(time.pthread_getcpuclockid(ident)))
            except (OSError, ProcessLookupError):  # ended meanwhile
                continue
        return seen

    def spent(self) -> dict[str, float]:
        """CPU seconds per side since this meter was made."""
        totals: dict[str, float] = {}
        for ident, (name, now) in self._read().items():
            side = self._side(name)
            if side is not None:
                totals[side] = totals.get(side, 0.0) + now - self._start.get(ident, (name, 0.0))[1]
        return totals
