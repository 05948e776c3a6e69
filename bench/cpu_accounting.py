"""What each process of a streaming benchmark spends per streamed chunk, and what a target's
chunk rate would cost at that price: the whole system's CPU budget (issue 13's capacity)."""

from __future__ import annotations

from typing import Any


def cpu_seconds(process: Any) -> float:
    """A process's CPU time so far (user + system, all its threads), in seconds."""
    times = process.cpu_times()
    return float(times.user + times.system)


# Issue 13's capacity target: 500 operations at 50 tokens/s, each token one streamed chunk.
TARGET_CHUNKS_PER_SECOND = 500 * 50


def cpu_per_chunk(seconds: dict[str, float], chunks: int, span: float) -> dict[str, Any]:
    """Each process's CPU per streamed chunk over the steady span, and what the target's chunk
    rate would cost at that price: the whole system's budget, against the machine's cores."""
    if chunks == 0:
        return {}
    us = {name: cpu / chunks * 1e6 for name, cpu in seconds.items()}
    total = sum(us.values())
    return {
        "chunks": chunks,
        "seconds": span,
        "us_per_chunk": us,
        "total_us_per_chunk": total,
        "cores_at_target": {
            name: v * TARGET_CHUNKS_PER_SECOND / 1e6 for name, v in {**us, "total": total}.items()
        },
    }


def cpu_pressure() -> str | None:
    """The kernel's CPU pressure (share of time some task waited for a core, over 10/60/300 s):
    on a shared machine, whether a failing load failed for lack of the cores neighbours took."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return None
