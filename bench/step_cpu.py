"""The runtime's CPU per step with no gRPC, no other process and no network: N `ticker`
operations (1-second steps, one chunk a step) on a RuntimeApp in this process, on SQLite.

    python -m bench.step_cpu --ops 2000 --window 10 [--profile 40]

bench.capacity measures the same load on a runtime process behind its gRPC server; this is its
in-process counterpart, for A/B pairs of a change to the step loop or the writes: the same code
path (the runner, its writes, the hub), fewer moving parts and less noise. It prints the steps/s
achieved and this process's CPU per completed step over the window; `--profile N` runs the
window under cProfile and prints its N costliest functions (cProfile roughly doubles the CPU per
step: read its figures against each other).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from runtime_service.app import RuntimeApp
from runtime_service.cli_options import DEFAULTS
from runtime_service.server import tune_gc
from tests.conftest import runtime_config

TICKER = {"steps": 100_000, "step_seconds": 1, "chunk_interval_seconds": 1}


def _steps_completed(path: Path) -> int:
    with sqlite3.connect(path) as db:
        value = db.execute("SELECT coalesce(sum(steps_completed), 0) FROM operations").fetchone()
    return int(value[0])


@contextlib.asynccontextmanager
async def tickers(url: str, ops: int) -> AsyncIterator[tuple[RuntimeApp, list[str]]]:
    """A RuntimeApp on `url` with `ops` tickers started (their ids), closed on the way out."""
    # The runtime's own poll and lease (the tests' config polls ten times as often, and its
    # background reads then cost a few per cent of the CPU per step).
    config = runtime_config(
        url,
        max_running=ops + 10,
        poll_seconds=DEFAULTS.poll_seconds,
        lease_seconds=DEFAULTS.lease_seconds,
    )
    app = await RuntimeApp.open(config)
    tune_gc()  # as the runtime process does once started (runtime_service.server.serve)
    try:
        ids = [(await app.operations.start("ticker", TICKER, "")).operation.id for _ in range(ops)]
        yield app, ids
    finally:
        await app.close()


async def measure(ops: int, window: float, settle: float, profile: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "steps.sqlite"
        async with tickers(f"sqlite:///{path}", ops):
            await asyncio.sleep(settle)
            before = await asyncio.to_thread(_steps_completed, path)
            cpu0, t0 = time.process_time(), time.perf_counter()
            # Timed by this thread's CPU, not the wall clock: with the database thread taking
            # the GIL in turns, a wall-clock profile charges its turns to whatever function
            # the event loop was in when it lost the GIL.
            profiler = cProfile.Profile(time.thread_time) if profile else None
            loop_cpu0 = time.thread_time()
            if profiler is not None:
                profiler.enable()
            await asyncio.sleep(window)
            if profiler is not None:
                profiler.disable()
            cpu1, t1 = time.process_time(), time.perf_counter()
            loop_cpu1 = time.thread_time()
            after = await asyncio.to_thread(_steps_completed, path)
    steps = max(1, after - before)
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(profile)
        _print_counts(stats, steps)
    return {
        "operations": ops,
        "steps_per_second": steps / (t1 - t0),
        "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
        "cpu_us_per_step": 1e6 * (cpu1 - cpu0) / steps,
        "loop_cpu_us_per_step": 1e6 * (loop_cpu1 - loop_cpu0) / steps,
    }


def _print_counts(stats: pstats.Stats, steps: int) -> None:
    """Calls a step, counted (not timed) by the profiler: unlike the CPU figures they do not move
    with the VM's speed, so an A/B of a change to the step path can be read from one run each."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    table = stats.stats  # type: ignore[attr-defined]
    calls = sum(row[1] for row in table.values())
    callbacks = sum(
        row[1]
        for (path, _, name), row in table.items()
        if name == "_run" and path.endswith("asyncio/events.py")
    )
    print(
        f"per completed step: {calls / steps:.1f} function calls, "
        f"{callbacks / steps:.2f} event loop callbacks"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=4.0)
    parser.add_argument("--profile", type=int, default=0, help="cProfile's N costliest (0: off)")
    args = parser.parse_args()
    result = asyncio.run(measure(args.ops, args.window, args.settle, args.profile))
    print(
        f"{result['operations']} operations: {result['steps_per_second']:,.0f} steps/s, "
        f"{result['cpu_percent']:.1f} % of a core, {result['cpu_us_per_step']:.1f} µs a step "
        f"({result['loop_cpu_us_per_step']:.1f} on the event loop's thread)"
    )


if __name__ == "__main__":
    main()
