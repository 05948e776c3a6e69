"""DBOS Transact peer for the Stopline benchmarks (issue 5, scenario 5).

DBOS Transact (PyPI ``dbos``) is the Postgres-backed durable-execution library users would
otherwise pick. This module measures, on the same PostgreSQL server Stopline uses, the three
figures Stopline is compared against:

* :func:`cancel_to_halt` - how fast ``DBOS.cancel_workflow`` returns and how long the workflow
  keeps going before it really stops, for a step in flight (an LLM call stand-in);
* :func:`per_step_overhead` - the cost of one checkpointed do-nothing step;
* :func:`concurrency` - 200 workflows of 20 short steps with half of them cancelled.

The scenarios live in ``dbos_cancel`` (1) and ``dbos_throughput`` (2, 3), the database and
DBOS set-up they share in ``dbos_session``; this module is the entry point and re-exports them.
Every scenario is self-contained: it creates its own throw-away database
(``dbos_bench_<random>``), launches DBOS on it, runs the scenario, then calls ``DBOS.destroy()``
and drops the database, so any number of scenarios can run one after another in one process
(DBOS keeps its registry of decorated functions across ``destroy()``, and a new
``DBOS(config=...)`` + ``launch()`` works in-process). All durations are in milliseconds, taken
with ``time.perf_counter()`` (one monotonic clock shared by every thread of the process).

Run alone: ``python -m bench.peers.dbos_peer`` (small sizes) or ``... --full`` (the sizes used
for BENCHMARKS.md). The PostgreSQL server is taken from ``STOPLINE_BENCH_PG_ADMIN_URL``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``, used only to create and drop the
per-run database).

``dbos`` is imported lazily so that importing this module never fails when the ``bench`` extra
is not installed; the scenario functions raise ``ImportError`` in that case.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from bench.peers.dbos_cancel import cancel_to_halt
from bench.peers.dbos_session import ADMIN_URL_ENV, APP_NAME, DEFAULT_ADMIN_URL, dbos_version
from bench.peers.dbos_throughput import concurrency, per_step_overhead
from bench.stats import summary_interpolated as summarize

__all__ = [
    "ADMIN_URL_ENV",
    "APP_NAME",
    "DEFAULT_ADMIN_URL",
    "cancel_to_halt",
    "concurrency",
    "dbos_version",
    "per_step_overhead",
    "run_all",
    "summarize",
]


# --------------------------------------------------------------------------------------------
# Stand-alone entry point
# --------------------------------------------------------------------------------------------


def run_all(quick: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Every DBOS scenario: full size (the issue's sizes, ~1.5-2.5 min on 2 cores) or ``quick``.

    Full: cancel-to-halt with 30 trials of 10 ms steps, 10 of 1 s and 3 of 30 s (each for both
    variants; the 30 s trials run concurrently), per-step overhead over 1,000 steps x 3, and 200
    workflows of 20 x 10 ms steps. Quick is a smoke-sized version (~15 s) without 30 s steps.
    ``cancel_to_halt`` is keyed by step length (``"0.01s"``, ``"1s"``, ``"30s"``).
    """
    if quick:
        cancel_plan = [(0.01, 5), (1.0, 2)]
        steps, reps = 200, 2
        n, conc_steps = 20, 5
    else:
        cancel_plan = [(0.01, 30), (1.0, 10), (30.0, 3)]
        steps, reps = 1000, 3
        n, conc_steps = 200, 20
    return {
        "peer": "dbos",
        "dbos_version": dbos_version(),
        "quick": quick,
        "cancel_to_halt": {
            f"{step:g}s": cancel_to_halt(step, trials, seed=seed) for step, trials in cancel_plan
        },
        "per_step_overhead": per_step_overhead(steps, repetitions=reps),
        # Repeated like Stopline's (bench/scenarios.py concurrency_repeated): compare medians.
        "concurrency": concurrency(n, conc_steps, 0.01, 0.5, repetitions=reps, seed=seed),
    }


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="the issue's sizes (~1.5-2.5 min)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run_all(quick=not args.full, seed=args.seed)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    _main()
