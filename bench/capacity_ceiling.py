"""The capacity ceiling: what one Python process on this machine can do at all for N operations
stepping once a second, with no Stopline logic — the counterpart of bench/floor.py for issue 17's
capacity target.

    python -m bench.capacity_ceiling --ops 10000 [--window 20 --settle 5]
    python -m bench.capacity --ops 10000 --backends sqlite --ceiling   # both, one run

A child process runs N asyncio tasks, each the bare minimum a `ticker` step (bench.capacity's
load: one chunk, one checkpoint a second) needs durably on SQLite: wake at its step's start,
store one output event (`UPDATE ... RETURNING` the operation's last seq, `INSERT` the event),
sleep to the step's end, store the checkpoint (`UPDATE` the step and state `RETURNING` the seq,
`INSERT` the step-completed and step-started events), and go on. Writes are group-committed on
one database thread as the runtime's are (one transaction per batch of whatever is queued; the
same pragmas: WAL, synchronous=NORMAL), with the same JSON text per event. No gRPC, no leases,
no attempts table, no metrics, no stop checks: whatever Stopline adds is the gap between this
and `bench.capacity` on the same backend in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE operations (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, step INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    state TEXT, updated_at TEXT NOT NULL);
CREATE TABLE events (
    operation_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (operation_id, seq));
"""
BUMP = (
    "UPDATE operations SET last_seq = last_seq + 1, updated_at = ? "
    "WHERE id = ? AND status = 'RUNNING' RETURNING last_seq"
)
EVENT = "INSERT INTO events (operation_id, seq, kind, data, created_at) VALUES (?, ?, ?, ?, ?)"
ADVANCE = (
    "UPDATE operations SET step = step + 1, state = ?, last_seq = last_seq + 2, updated_at = ? "
    "WHERE id = ? AND status = 'RUNNING' RETURNING last_seq"
)
TWO_EVENTS = (
    "INSERT INTO events (operation_id, seq, kind, data, created_at) "
    "VALUES (?, ?, ?, ?, ?), (?, ?, ?, ?, ?)"
)

Write = Callable[[sqlite3.Cursor], Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class GroupCommit:
    """Writes queued while a batch is written go together in the next one, on one thread."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._queue: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._draining = False
        self._loop = asyncio.get_running_loop()

    def submit(self, write: Write) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        self._queue.append((write, future))
        if not self._draining:
            self._draining = True
            threading.Thread(target=self._drain, daemon=True).start()
        return future

    def _drain(self) -> None:
        while True:
            batch = list(self._queue)
            self._queue.clear()  # appended to only on the loop; read here between batches
            if not batch:
                self._loop.call_soon_threadsafe(self._idle)
                return
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            results = [write(cur) for write, _ in batch]
            cur.execute("COMMIT")
            self._loop.call_soon_threadsafe(self._resolve, batch, results)

    def _resolve(self, batch: list[tuple[Write, asyncio.Future[Any]]], results: list[Any]) -> None:
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    def _idle(self) -> None:
        self._draining = False
        if self._queue:  # queued between the thread's last look and this callback
            self._draining = True
            threading.Thread(target=self._drain, daemon=True).start()


def _chunk(op_id: str, text: str) -> Write:
    def write(cur: sqlite3.Cursor) -> int:
        now = _now()
        seq = cur.execute(BUMP, (now, op_id)).fetchone()[0]
        cur.execute(EVENT, (op_id, seq, "output_chunk", text, now))
        return int(seq)

    return write


def _boundary(op_id: str, step: int, state: str, completed: str, started: str) -> Write:
    def write(cur: sqlite3.Cursor) -> int:
        now = _now()
        seq = cur.execute(ADVANCE, (state, now, op_id)).fetchone()[0]
        cur.execute(
            TWO_EVENTS,
            (op_id, seq - 1, "step_completed", completed, now,
             op_id, seq, "step_started", started, now),
        )  # fmt: skip
        return int(seq)

    return write


async def _operation(db: GroupCommit, op_id: str, offset: float) -> None:
    loop = asyncio.get_running_loop()
    dumps = json.dumps
    await asyncio.sleep(offset)
    step, ticks = 0, 0
    while True:
        began = loop.time()
        await db.submit(_chunk(op_id, dumps({"step": step, "text": f"step {step} tick 0"})))
        ticks += 1
        await asyncio.sleep(max(0.0, began + 1.0 - loop.time()))
        state = dumps({"ticks": ticks})
        completed = dumps({"step": step, "output": {"step": step, "ticks": ticks}})
        started = dumps({"step": step + 1, "attempt": 1})
        await db.submit(_boundary(op_id, step, state, completed, started))
        step += 1


async def _child(n: int, path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    now = _now()
    conn.executemany(
        "INSERT INTO operations VALUES (?, 'RUNNING', 0, 0, NULL, ?)",
        [(f"op-{i:06d}", now) for i in range(n)],
    )
    conn.close()
    db = GroupCommit(path)
    # Spread over the first second, as operations started one after another are.
    tasks = [asyncio.create_task(_operation(db, f"op-{i:06d}", i / n)) for i in range(n)]
    print("running", flush=True)
    await asyncio.gather(*tasks)


def _steps(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COALESCE(SUM(step), 0) FROM operations").fetchone()[0])
    finally:
        conn.close()


def measure(n: int, window: float, settle: float) -> dict[str, Any]:
    """Run the ceiling child for N operations; its steps/s and CPU over the window."""
    import psutil  # bench extra only

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ceiling.db"
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.capacity_ceiling", "--child", str(n), str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            child.stdout.readline()  # "running"
            time.sleep(1.0 + settle)
            proc = psutil.Process(child.pid)
            before, t0, c0 = _steps(path), time.perf_counter(), proc.cpu_times()
            time.sleep(window)
            after, elapsed, c1 = _steps(path), time.perf_counter() - t0, proc.cpu_times()
            rss = proc.memory_info().rss
        finally:
            child.terminate()
            child.wait(10)
    cpu = c1.user + c1.system - c0.user - c0.system
    achieved = (after - before) / elapsed
    return {
        "operations": n,
        "steps_per_second_achieved": achieved,
        "fraction_of_nominal": achieved / n,
        "cpu_percent": 100 * cpu / elapsed,
        "cpu_us_per_step": 1e6 * cpu / max(1, after - before),
        "rss_mb": rss / 2**20,
        "window_seconds": elapsed,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--child", nargs=2, metavar=("N", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(_child(int(args.child[0]), Path(args.child[1])))
        return
    print(json.dumps(measure(args.ops, args.window, args.settle), indent=1))


if __name__ == "__main__":
    main()
