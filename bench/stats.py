"""Percentiles and summaries, in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def summarize(latencies: Sequence[float]) -> dict[str, Any]:
    """n, p50, p90, p99, max and mean of latencies given in seconds, as milliseconds."""
    if not latencies:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    values = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "n": len(values),
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(values.max()), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, rounded, or None when either is missing."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)
