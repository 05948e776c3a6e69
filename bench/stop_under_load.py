"""A stop's latency while the runtime is busy: N `ticker` operations stepping once a second on a
RuntimeApp in this process (SQLite, as bench.step_cpu, or PostgreSQL in a database of its own),
and one more operation at a time stopped, with a pause between stops; for each stop, how long
`interrupt` took to return (the runtime's part of an acknowledgment: the stop recorded durably)
and how long until its INTERRUPTED event was published (the runtime's part of stop -> terminal
event).

    python -m bench.stop_under_load --ops 3000 --stops 60 [--backend postgresql]

The latency benchmarks (bench.run's stop scenarios, the table) stop an operation on a runtime
with nothing else to do; this one asks what a stop costs when the runtime is near its capacity,
where every write queues behind others. No gRPC and no gateway: what the runtime adds under
load, for A/B pairs of a change to the write path (run each arm from its own checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from bench.stack import ADMIN_URL, admin
from bench.step_cpu import tickers
from runtime_service.app import RuntimeApp
from runtime_service.domain import EventKind, StopCause


async def _stop_one(app: RuntimeApp, op_id: str) -> tuple[float, float]:
    """(ms until interrupt() returned, ms until INTERRUPTED was published)."""
    with app.hub.subscribe(op_id) as events:
        began = time.perf_counter()
        await app.operations.interrupt(op_id, "bench", "under load", cause=StopCause.USER)
        acked = time.perf_counter()
        while True:
            event = await events.next(30.0)
            if event is not None and event.kind is EventKind.INTERRUPTED:
                return 1000 * (acked - began), 1000 * (time.perf_counter() - began)


@contextlib.contextmanager
def _database(backend: str) -> Iterator[str]:
    """A database URL of this run's own, removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'stops.sqlite'}"
        return
    name = f"stopline_bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(False)
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def measure(
    ops: int, stops: int, settle: float, seed: int = 1, backend: str = "sqlite"
) -> dict[str, Any]:
    rng = random.Random(seed)
    with _database(backend) as url:
        async with tickers(url, ops + stops) as (app, ids):
            await asyncio.sleep(settle)
            acks: list[float] = []
            halts: list[float] = []
            for op_id in ids[:stops]:
                # Stops land at random moments of the load's one-second cycle.
                await asyncio.sleep(rng.uniform(0.05, 0.25))
                ack, halt = await _stop_one(app, op_id)
                acks.append(ack)
                halts.append(halt)
    return {
        "backend": backend,
        "operations": ops,
        "stops": stops,
        "ack_ms": acks,
        "interrupted_ms": halts,
    }


def _summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered):.1f}, p90 {p90:.1f}, max {ordered[-1]:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--stops", type=int, default=60)
    parser.add_argument("--settle", type=float, default=4.0)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    result = asyncio.run(measure(args.ops, args.stops, args.settle, backend=args.backend))
    print(
        f"{result['backend']}, {result['operations']} operations running, "
        f"{result['stops']} stops: "
        f"acknowledged {_summary(result['ack_ms'])}; "
        f"INTERRUPTED {_summary(result['interrupted_ms'])}"
    )


if __name__ == "__main__":
    main()
