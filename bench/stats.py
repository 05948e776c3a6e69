"""Summaries of latency samples: medians and tail percentiles, never means alone.

Three p99 definitions live here because three figures were published with them: Stopline's
own scenarios (:func:`summary`, nearest index by rounding), the DBOS peer
(:func:`summary_interpolated`, numpy's linear interpolation) and the LangGraph peer
(:func:`summary_nearest_rank`, ceil rank, rounded to the microsecond). Keeping them side by
side makes the difference visible; changing one would change the numbers in BENCHMARKS.md.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "median": statistics.median(samples) if samples else float("nan"),
        "p99": percentile(samples, 99),
        "min": min(samples) if samples else float("nan"),
        "max": max(samples) if samples else float("nan"),
        "samples": samples,
    }


def percentile_interpolated(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), so p99 of few samples is not just max."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_interpolated(samples: Sequence[float]) -> dict[str, float]:
    """Median/p99/min/max/n, p99 interpolated, NaN when there are no samples (the DBOS peer)."""
    if not samples:
        return {"n": 0, "median": math.nan, "p99": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p99": percentile_interpolated(samples, 99),
        "min": min(samples),
        "max": max(samples),
    }


def percentile_nearest_rank(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with fewer than 100 samples p99 is close to the max."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_nearest_rank(samples: Sequence[float]) -> dict[str, float | int | None]:
    """Median and nearest-rank p99 rounded to 3 places, None when empty (the LangGraph peer)."""
    if not samples:
        return {"n": 0, "median": None, "p99": None, "min": None, "max": None}
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 3),
        "p99": round(percentile_nearest_rank(ordered, 99), 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def ratio_interval(
    ours: Sequence[float],
    floor: Sequence[float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A percentile-bootstrap interval of median(ours) / median(floor): how far one run's ratio
    could move by the luck of its trials alone. Samples of equal count are taken as pairs (a
    stop and the floor trials beside it, scenarios.stop_latency) and resampled together, so
    that a slow moment of the VM counts in both or in neither; otherwise each is resampled on
    its own. None without samples."""
    if not ours or not floor:
        return None
    rng = random.Random(seed)
    paired = len(ours) == len(floor)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(len(ours)) for _ in ours]
        a = [ours[i] for i in picks]
        if paired:
            b = [floor[i] for i in picks]
        else:
            b = [floor[rng.randrange(len(floor))] for _ in floor]
        below = statistics.median(b)
        if below > 0:
            ratios.append(statistics.median(a) / below)
    if not ratios:
        return None
    tail = (1 - level) / 2 * 100
    return (
        percentile_interpolated(ratios, tail),
        percentile_interpolated(ratios, 100 - tail),
    )
