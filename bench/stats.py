"""Small statistics helpers shared by the side-by-side benchmark (pure functions, unit tested).

Percentiles use the nearest-rank definition on the sorted sample (no interpolation): p99 of
100 samples is the 99th smallest, so a reported p99 is always a latency that really happened.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["percentile", "summarize", "ratio", "best", "fmt_value", "fmt_ratio"]


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]. Raises ValueError on an empty sample."""
    vals = sorted(values)
    if not vals:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if q == 0:
        return vals[0]
    rank = math.ceil(q / 100 * len(vals))
    return vals[min(len(vals), max(1, rank)) - 1]


def summarize(values: Sequence[float], scale: float = 1.0, unit: str = "us",
              digits: int = 3) -> dict:
    """``{n, median_<unit>, p99_<unit>, mean_<unit>, min_<unit>, max_<unit>}`` of ``values``
    multiplied by ``scale`` (e.g. seconds -> microseconds: scale=1e6)."""
    if not values:
        raise ValueError("summarize of an empty sample")
    vals = sorted(v * scale for v in values)
    r = lambda x: round(x, digits)  # noqa: E731
    return {"n": len(vals), f"median_{unit}": r(percentile(vals, 50)),
            f"p99_{unit}": r(percentile(vals, 99)), f"mean_{unit}": r(sum(vals) / len(vals)),
            f"min_{unit}": r(vals[0]), f"max_{unit}": r(vals[-1])}


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def best(values: Iterable[float | None], higher_is_better: bool = False) -> float | None:
    """The best of the non-None values (min for latencies, max for throughputs); None if none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return max(vals) if higher_is_better else min(vals)


def fmt_value(v: float | None, unit: str = "") -> str:
    """A human figure with 3 significant digits (``1.23 us``, ``45.6 ms``, ``12300 /s``)."""
    if v is None:
        return "n/a"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "n/a"
    a = abs(v)
    if a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return f"{s} {unit}".strip()


def fmt_ratio(r: float | None) -> str:
    """``0.25x``, ``1.3x``, ``120x``; ``-`` when missing."""
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"
