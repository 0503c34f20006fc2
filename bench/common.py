"""Small helpers shared by the benchmark scripts: percentiles and ratio tables."""

from __future__ import annotations

from collections.abc import Sequence
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
