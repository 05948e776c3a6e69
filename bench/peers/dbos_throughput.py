"""DBOS peer, scenarios 2 and 3: per-step overhead and many concurrent workflows."""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bench.peers.dbos_session import REG, TRACER, dbos_session, dbos_version, register
from bench.stats import summary_interpolated

# --------------------------------------------------------------------------------------------
# 2. Per-step overhead
# --------------------------------------------------------------------------------------------


def per_step_overhead(
    steps: int = 1000,
    *,
    repetitions: int = 3,
    variants: Sequence[str] = ("sync", "async"),
) -> dict[str, Any]:
    """Cost of one checkpointed do-nothing DBOS step: wall time of a ``steps``-step workflow/steps.

    Why: the issue's target is Stopline's per-step cost at most half of DBOS's on the same
    PostgreSQL. Each DBOS step reads its checkpoint (so a replay can skip it) and writes its
    output, i.e. two round trips to PostgreSQL, which is the overhead measured here.

    Time runs from ``DBOS.start_workflow`` to ``handle.get_result()`` returning, so the
    workflow's own start/finish rows are amortised over the steps (negligible at 1,000 steps).
    Two shapes: ``"sync"`` (a plain workflow of plain steps, run on DBOS's thread pool) and
    ``"async"`` (coroutine workflow/steps, DBOS hops to a thread for each database call). One
    untimed 20-step warm-up run per variant precedes the ``repetitions`` timed runs.
    ``best_variant`` names the faster median; the top-level ``median_ms``/``p99_ms`` are its.
    """
    from dbos import DBOS

    reg = register()
    workflows = {"sync": reg.noop_wf_sync, "async": reg.noop_wf_async}
    out: dict[str, Any] = {}
    t_begin = time.perf_counter()
    with dbos_session() as setup:
        for v in variants:
            wf = workflows[v]
            DBOS.start_workflow(wf, 20).get_result()
            samples: list[float] = []
            for _ in range(repetitions):
                t0 = time.perf_counter()
                done = DBOS.start_workflow(wf, steps).get_result()
                elapsed = time.perf_counter() - t0
                assert done == steps
                samples.append(elapsed * 1e3 / steps)
            out[v] = {"per_step_ms": samples, "summary": summary_interpolated(samples)}
    best = min(out, key=lambda v: out[v]["summary"]["median"])
    return {
        "peer": "dbos",
        "scenario": "per_step_overhead",
        "dbos_version": dbos_version(),
        "steps": steps,
        "repetitions": repetitions,
        "variants": out,
        "best_variant": best,
        "median_ms": out[best]["summary"]["median"],
        "p99_ms": out[best]["summary"]["p99"],
        "setup": setup,
        "wall_s": time.perf_counter() - t_begin,
    }


# --------------------------------------------------------------------------------------------
# 3. Concurrency
# --------------------------------------------------------------------------------------------


async def _concurrency_run(
    n: int,
    steps: int,
    step_seconds: float,
    stop_fraction: float,
    rng: random.Random,
    timeout_s: float,
    preemptible: bool,
) -> dict[str, Any]:
    from dbos import DBOS, SetWorkflowID

    reg = REG
    ids = [f"conc-{i:04d}-{uuid.uuid4().hex[:8]}" for i in range(n)]
    to_stop = set(rng.sample(ids, round(n * stop_fraction)))
    nominal_s = steps * step_seconds
    stop_offsets = {wid: rng.uniform(0.0, nominal_s) for wid in ids if wid in to_stop}
    started = {wid: asyncio.Event() for wid in ids}
    cancel_call: dict[str, float] = {}
    cancel_ack: dict[str, float] = {}
    resolved: dict[str, float] = {}
    outcome: dict[str, str] = {}

    async def start(wid: str) -> Any:
        with SetWorkflowID(wid):
            handle = await DBOS.start_workflow_async(reg.sleep_wf, steps, step_seconds, preemptible)
        started[wid].set()
        return handle

    async def wait_result(handle: Any) -> None:
        wid = handle.get_workflow_id()
        try:
            await handle.get_result()
            outcome[wid] = "returned"
        except Exception as exc:
            outcome[wid] = type(exc).__name__
        resolved[wid] = time.perf_counter()

    async def stopper(wid: str, t0: float) -> None:
        await started[wid].wait()
        delay = t0 + stop_offsets[wid] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        cancel_call[wid] = time.perf_counter()
        await DBOS.cancel_workflow_async(wid)
        cancel_ack[wid] = time.perf_counter()

    t0 = time.perf_counter()
    stoppers = [asyncio.create_task(stopper(wid, t0)) for wid in stop_offsets]
    handles = await asyncio.gather(*(start(wid) for wid in ids))
    t_started = time.perf_counter()
    waiters = [asyncio.create_task(wait_result(h)) for h in handles]
    _done, pending = await asyncio.wait([*waiters, *stoppers], timeout=timeout_s)
    t_end = time.perf_counter()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    statuses = {
        s.workflow_id: str(s.status)
        for s in await DBOS.list_workflows_async(
            workflow_ids=ids, load_input=False, load_output=False
        )
    }
    traces = {wid: TRACER.get(wid) for wid in ids}
    finals = {"SUCCESS", "CANCELLED", "ERROR"}
    stuck = [
        w
        for w in ids
        if w not in resolved or traces[w].body_exit is None or statuses.get(w) not in finals
    ]
    wrong: list[str] = []
    late_cancels: list[str] = []
    for w in ids:
        if w in stuck:
            continue
        if w in to_stop:
            if statuses[w] == "CANCELLED":
                continue
            # a cancel sent after the workflow had already finished is a no-op, not an error
            exit_t = traces[w].body_exit
            if (
                statuses[w] == "SUCCESS"
                and exit_t is not None
                and exit_t < cancel_call.get(w, math.inf)
            ):
                late_cancels.append(w)
            else:
                wrong.append(w)
        elif statuses[w] != "SUCCESS":
            wrong.append(w)
    # the moment every workflow had really stopped running *and* had its final status recorded
    final_at: list[float] = []
    for w in ids:
        if w in stuck:
            continue
        exit_t = traces[w].body_exit or math.inf
        final_at.append(
            max(exit_t, cancel_ack.get(w, 0.0)) if statuses[w] == "CANCELLED" else resolved[w]
        )
    cancelled_ok = [w for w in to_stop if w not in stuck and statuses.get(w) == "CANCELLED"]
    steps_after = sum(
        sum(1 for t in traces[w].step_started.values() if t > cancel_ack[w]) for w in cancelled_ok
    )
    return {
        "wall_ms": (max(final_at) - t0) * 1e3 if final_at and not stuck else math.nan,
        "handles_resolved_ms": (max(resolved.values()) - t0) * 1e3 if resolved else math.nan,
        "start_phase_ms": (t_started - t0) * 1e3,
        "timed_out": bool(pending),
        "elapsed_until_wait_end_ms": (t_end - t0) * 1e3,
        "cancel_ack_ms": [(cancel_ack[w] - cancel_call[w]) * 1e3 for w in cancelled_ok],
        "cancel_halt_ms": [
            (max(traces[w].body_exit or math.inf, cancel_ack[w]) - cancel_call[w]) * 1e3
            for w in cancelled_ok
        ],
        "stopped": len(to_stop),
        "cancelled_ok": len(cancelled_ok),
        "succeeded_ok": sum(1 for w in ids if w not in to_stop and statuses.get(w) == "SUCCESS"),
        "wrong": len(wrong),
        "stuck": len(stuck),
        "late_cancels": len(late_cancels),
        "steps_started_after_cancel_ack": steps_after,
        "status_counts": {
            s: list(statuses.values()).count(s) for s in sorted(set(statuses.values()))
        },
    }


def concurrency(
    n: int = 200,
    steps: int = 20,
    step_seconds: float = 0.01,
    stop_fraction: float = 0.5,
    *,
    repetitions: int = 1,
    preemptible: bool = False,
    timeout_s: float = 120.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """``n`` workflows of ``steps`` sleeping steps started at once, some of them cancelled.

    Why: the issue's concurrency target is Stopline at least 4x faster wall time than DBOS with zero
    wrong or stuck final states. Everything runs on one asyncio loop the way an async DBOS app
    would: all ``n`` ``DBOS.start_workflow_async`` calls are gathered at once (the workflows run
    on that loop), and each workflow picked for stopping (a random ``stop_fraction``) gets
    ``DBOS.cancel_workflow_async`` at a uniformly random moment in ``[0, steps*step_seconds]``
    after the batch began (the nominal length of one workflow) — never before its own start
    call returned.

    ``wall_ms`` is from the first start call until every workflow had *really* stopped and had
    a final status: for a cancelled one, its body exited (see :func:`cancel_to_halt`) and its
    CANCELLED row was committed; for the others, ``handle.get_result()`` returned (SUCCESS is
    recorded). Afterwards statuses are read back from DBOS: ``wrong`` counts picked workflows
    not CANCELLED (except ``late_cancels``: cancel sent after the workflow had already
    finished, which DBOS rightly ignores) and others not SUCCESS; ``stuck`` counts workflows
    not final / not exited within ``timeout_s``. Samples: ``wall_ms`` per repetition and, pooled,
    per-cancel ack and halt latencies under load.
    """
    reg = register()
    if preemptible and not reg.preemptible_supported:
        raise ValueError(f"dbos {dbos_version()} has no preemptible steps")
    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    t_begin = time.perf_counter()
    with dbos_session() as setup:
        from dbos import DBOS

        DBOS.start_workflow(reg.sleep_wf, 2, 0.001, False).get_result()  # warm-up
        for _ in range(repetitions):
            runs.append(
                asyncio.run(
                    _concurrency_run(
                        n,
                        steps,
                        step_seconds,
                        stop_fraction,
                        random.Random(rng.random()),
                        timeout_s,
                        preemptible,
                    )
                )
            )
            TRACER.reset()
    wall = [r["wall_ms"] for r in runs]
    acks = [x for r in runs for x in r["cancel_ack_ms"]]
    halts = [x for r in runs for x in r["cancel_halt_ms"]]
    return {
        "peer": "dbos",
        "scenario": "concurrency",
        "dbos_version": dbos_version(),
        "n": n,
        "steps": steps,
        "step_seconds": step_seconds,
        "stop_fraction": stop_fraction,
        "preemptible": preemptible,
        "repetitions": repetitions,
        "wall_ms": wall,
        "summary": {
            "wall_ms": summary_interpolated(wall),
            "cancel_ack_ms": summary_interpolated(acks),
            "cancel_halt_ms": summary_interpolated(halts),
        },
        "cancel_ack_ms": acks,
        "cancel_halt_ms": halts,
        "wrong": sum(r["wrong"] for r in runs),
        "stuck": sum(r["stuck"] for r in runs),
        "late_cancels": sum(r["late_cancels"] for r in runs),
        "runs": [
            {k: v for k, v in r.items() if k not in ("cancel_ack_ms", "cancel_halt_ms")}
            for r in runs
        ],
        "setup": setup,
        "wall_s": time.perf_counter() - t_begin,
    }
