"""What one durable write costs PostgreSQL here, busy and after an idle pause: a bare one-row
`UPDATE` with its commit from psycopg (autocommit, as the runtime's batcher sends it), back to
back and after a random pause of 50-200 ms (the stop scenarios' pacing), and the same on a
temporary table (no WAL, no sync), which isolates the round trip to a woken server process.

A stop's acknowledgment on PostgreSQL waits for one such write in the runtime; the floor it is
divided by has no database process at all. This is the probe behind BENCHMARKS.md's note on
what limits the PostgreSQL acknowledgment.

    python -m bench.pg_idle [--trials 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from typing import Any

from bench.stack import ADMIN_URL
from runtime_service.notifications import libpq_url


def measure(trials: int) -> dict[str, float]:
    """Medians (ms) by "table pacing", in a database of its own (created and dropped here)."""
    import psycopg

    admin_url = libpq_url(ADMIN_URL)
    name = f"stopline_pg_idle_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        return _measure(psycopg.connect(admin_url, dbname=name, autocommit=True), trials)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")


def _measure(conn: Any, trials: int) -> dict[str, float]:
    medians: dict[str, float] = {}
    with conn:
        conn.execute("CREATE TEMPORARY TABLE idle_probe_temp (id int PRIMARY KEY, v int)")
        conn.execute("CREATE TABLE idle_probe (id int PRIMARY KEY, v int)")
        for table in ("idle_probe_temp", "idle_probe"):
            conn.execute(f"INSERT INTO {table} VALUES (1, 0)")
            for pacing in ("busy", "idle"):
                samples = []
                for _ in range(trials):
                    if pacing == "idle":
                        time.sleep(random.uniform(0.05, 0.2))  # pacing, as the stops'
                    began = time.perf_counter()
                    conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
                    samples.append((time.perf_counter() - began) * 1000.0)
                medians[f"{table} {pacing}"] = statistics.median(samples)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    labels = {
        "idle_probe_temp": "UPDATE, temporary table (no WAL)",
        "idle_probe": "UPDATE + commit (WAL, fdatasync)",
    }
    print(f"PostgreSQL one-row write from psycopg, {args.trials} each; medians (ms)")
    for key, value in measure(args.trials).items():
        table, pacing = key.split()
        print(f"  {labels[table]:<36} {pacing:<5} {value:7.3f}")


if __name__ == "__main__":
    main()
