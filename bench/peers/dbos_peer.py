"""DBOS Transact peer for the Stopline benchmarks (issue 5, scenario 5).

DBOS Transact (PyPI ``dbos``) is the Postgres-backed durable-execution library users would
otherwise pick. This module measures, on the same PostgreSQL server Stopline uses, the three
figures Stopline is compared against:

* :func:`cancel_to_halt` - how fast ``DBOS.cancel_workflow`` returns and how long the workflow
  keeps going before it really stops, for a step in flight (an LLM call stand-in);
* :func:`per_step_overhead` - the cost of one checkpointed do-nothing step;
* :func:`concurrency` - 200 workflows of 20 short steps with half of them cancelled.

Every function is self-contained: it creates its own throw-away database
(``dbos_bench_<random>``), launches DBOS on it, runs the scenario, then calls
``DBOS.destroy()`` and drops the database, so any number of scenarios can run one after another
in one process (DBOS keeps its registry of decorated functions across ``destroy()``, and a new
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
import asyncio
import importlib.metadata
import inspect
import json
import logging
import math
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ADMIN_URL_ENV = "STOPLINE_BENCH_PG_ADMIN_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
APP_NAME = "stopline-bench-dbos"

# How long after the workflow body has exited we keep watching for a step that should not start.
_SETTLE_S = 0.05


# --------------------------------------------------------------------------------------------
# Statistics helpers
# --------------------------------------------------------------------------------------------


def _percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), so p99 of few samples is not just max."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median/p99/min/max/n of a sample list; medians and p99s are what the issue reports."""
    if not samples:
        return {"n": 0, "median": math.nan, "p99": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p99": _percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
    }


def dbos_version() -> str:
    """Installed ``dbos`` distribution version, reported next to every figure."""
    try:
        return importlib.metadata.version("dbos")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# Instrumentation shared by the workflows (they run on DBOS threads / event loops)
# --------------------------------------------------------------------------------------------


@dataclass
class _WorkflowTrace:
    """What one workflow did, stamped with ``perf_counter`` from inside DBOS's threads."""

    step_started: dict[int, float] = field(default_factory=dict)
    step_finished: dict[int, float] = field(default_factory=dict)  # sleep ran to completion
    step_aborted: dict[int, float] = field(default_factory=dict)  # sleep was cancelled
    body_exit: float | None = None  # the workflow function itself stopped running
    body_exit_error: str | None = None


class _Tracer:
    """Thread-safe per-workflow event log with a condition so a driver can wait for an event."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._traces: dict[str, _WorkflowTrace] = {}

    def reset(self) -> None:
        with self._cond:
            self._traces.clear()

    def _trace(self, wf_id: str) -> _WorkflowTrace:
        trace = self._traces.get(wf_id)
        if trace is None:
            trace = self._traces[wf_id] = _WorkflowTrace()
        return trace

    def record(self, wf_id: str, kind: str, index: int = -1, error: str | None = None) -> None:
        now = time.perf_counter()
        with self._cond:
            trace = self._trace(wf_id)
            if kind == "start":
                trace.step_started[index] = now
            elif kind == "finish":
                trace.step_finished[index] = now
            elif kind == "abort":
                trace.step_aborted[index] = now
            elif kind == "exit":
                trace.body_exit = now
                trace.body_exit_error = error
            self._cond.notify_all()

    def wait_for(
        self, wf_id: str, predicate: Callable[[_WorkflowTrace], bool], timeout: float
    ) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._trace(wf_id)), timeout)

    def get(self, wf_id: str) -> _WorkflowTrace:
        with self._cond:
            t = self._trace(wf_id)
            return _WorkflowTrace(
                dict(t.step_started),
                dict(t.step_finished),
                dict(t.step_aborted),
                t.body_exit,
                t.body_exit_error,
            )


_TRACER = _Tracer()


class _Registered:
    """The DBOS workflows and steps, decorated once per process (DBOS's registry is global)."""

    preemptible_supported: bool = False
    sleep_wf: Any = None
    noop_wf_sync: Any = None
    noop_wf_async: Any = None
    done: bool = False


_REG = _Registered()
_REG_LOCK = threading.Lock()


async def _sleep_body(index: int, seconds: float) -> int:
    """The stand-in for an LLM call: an awaitable sleep that notes whether it was cut short."""
    from dbos import DBOS

    wf_id = DBOS.workflow_id or "?"
    _TRACER.record(wf_id, "start", index)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _TRACER.record(wf_id, "abort", index)
        raise
    _TRACER.record(wf_id, "finish", index)
    return index


def _register() -> _Registered:
    """Decorate the benchmark workflows (lazily, so importing this module needs no ``dbos``)."""
    with _REG_LOCK:
        if _REG.done:
            return _REG
        from dbos import DBOS

        # Async steps can be made preemptible (cancelled mid-step once the workflow is seen
        # CANCELLED) in recent DBOS releases; older ones have no such option.
        _REG.preemptible_supported = "preemptible" in inspect.signature(DBOS.step).parameters

        @DBOS.step(name="stopline_bench.sleep_step")
        async def sleep_step(index: int, seconds: float) -> int:
            return await _sleep_body(index, seconds)

        if _REG.preemptible_supported:

            @DBOS.step(name="stopline_bench.sleep_step_preemptible", preemptible=True)
            async def sleep_step_preemptible(index: int, seconds: float) -> int:
                return await _sleep_body(index, seconds)

        else:  # pragma: no cover - depends on the installed dbos
            sleep_step_preemptible = sleep_step

        @DBOS.workflow(name="stopline_bench.sleep_wf")
        async def sleep_wf(steps: int, seconds: float, preemptible: bool) -> int:
            wf_id = DBOS.workflow_id or "?"
            step = sleep_step_preemptible if preemptible else sleep_step
            try:
                for i in range(steps):
                    await step(i, seconds)
            except BaseException as exc:
                _TRACER.record(wf_id, "exit", error=type(exc).__name__)
                raise
            _TRACER.record(wf_id, "exit")
            return steps

        @DBOS.step(name="stopline_bench.noop_step_sync")
        def noop_step_sync() -> None:
            return None

        @DBOS.workflow(name="stopline_bench.noop_wf_sync")
        def noop_wf_sync(steps: int) -> int:
            for _ in range(steps):
                noop_step_sync()
            return steps

        @DBOS.step(name="stopline_bench.noop_step_async")
        async def noop_step_async() -> None:
            return None

        @DBOS.workflow(name="stopline_bench.noop_wf_async")
        async def noop_wf_async(steps: int) -> int:
            for _ in range(steps):
                await noop_step_async()
            return steps

        _REG.sleep_wf = sleep_wf
        _REG.noop_wf_sync = noop_wf_sync
        _REG.noop_wf_async = noop_wf_async
        _REG.done = True
        return _REG


class _DropExpectedCancelLogs(logging.Filter):
    """DBOS logs a traceback at ERROR (and a warning that the run lost ownership of its workflow)
    for every background workflow that ends cancelled; that is the expected outcome here (checked
    by the benchmark itself), so drop those records to keep the output readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and "Cancelled" in type(exc).__name__:
            return False
        msg = record.getMessage()
        return not any(
            text in msg
            for text in ("was cancelled", "Aborting preemptible step", "no longer owned by this")
        )


@contextmanager
def _dbos_session(**config_overrides: Any) -> Iterator[dict[str, Any]]:
    """A fresh database + launched DBOS for one scenario, destroyed and dropped afterwards.

    Yields a description of the setup (database URL without credentials, DBOS config knobs)
    so that it can be reported next to the figures.
    """
    import psycopg
    from dbos import DBOS

    _register()
    admin_url = os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL)
    db_name = f"dbos_bench_{uuid.uuid4().hex[:12]}"
    base = admin_url.rsplit("/", 1)[0]
    sys_db_url = f"{base}/{db_name}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    log_filter = _DropExpectedCancelLogs()
    dbos_logger = logging.getLogger("dbos")
    dbos_logger.addFilter(log_filter)
    for handler in dbos_logger.handlers:
        handler.addFilter(log_filter)
    try:
        config: dict[str, Any] = {
            "name": APP_NAME,
            "system_database_url": sys_db_url,
            "log_level": "WARNING",
            **config_overrides,
        }
        DBOS(config=config)  # type: ignore[arg-type]
        DBOS.launch()
        yield {
            "database": db_name,
            "server": base.split("@")[-1],
            "config": {k: v for k, v in config.items() if k != "system_database_url"},
        }
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=0)
        dbos_logger.removeFilter(log_filter)
        for handler in logging.getLogger("dbos").handlers:
            handler.removeFilter(log_filter)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        _TRACER.reset()


def _status_of(wf_id: str) -> str | None:
    from dbos import DBOS

    status = DBOS.get_workflow_status(wf_id)
    return None if status is None else str(status.status)


# --------------------------------------------------------------------------------------------
# 1. Cancel-to-halt
# --------------------------------------------------------------------------------------------

_STEPS_PER_CANCEL_TRIAL = 3  # the cancel lands in step 0; steps 1 and 2 must never start


def _one_cancel_trial(
    step_seconds: float, preemptible: bool, window: tuple[float, float], rng: random.Random
) -> dict[str, Any]:
    """Start a workflow, cancel it at a random moment of its first step, and time the halt."""
    from dbos import DBOS, SetWorkflowID

    reg = _REG
    wf_id = f"cancel-{uuid.uuid4()}"
    fraction = rng.uniform(*window)
    with SetWorkflowID(wf_id):
        # An async workflow started from a plain thread runs on DBOS's background event loop, so
        # this thread is free to play the client and call the synchronous cancel_workflow.
        handle = DBOS.start_workflow(
            reg.sleep_wf, _STEPS_PER_CANCEL_TRIAL, step_seconds, preemptible
        )
    wait_cap = 30.0 + 3 * step_seconds
    if not _TRACER.wait_for(wf_id, lambda t: 0 in t.step_started, wait_cap):
        raise RuntimeError(f"step 0 of {wf_id} never started")
    step_start = _TRACER.get(wf_id).step_started[0]
    target = step_start + fraction * step_seconds
    delay = target - time.perf_counter()
    if delay > 0:
        time.sleep(delay)

    t_cancel = time.perf_counter()
    DBOS.cancel_workflow(wf_id)
    t_ack = time.perf_counter()

    result_error: str | None = None
    try:
        handle.get_result()
    except Exception as exc:  # the expected outcome: DBOSAwaitedWorkflowCancelledError
        result_error = type(exc).__name__
    t_result = time.perf_counter()

    if not _TRACER.wait_for(wf_id, lambda t: t.body_exit is not None, wait_cap):
        raise RuntimeError(f"workflow {wf_id} body never exited")
    time.sleep(_SETTLE_S)
    trace = _TRACER.get(wf_id)
    status = _status_of(wf_id)
    recorded_steps = DBOS.list_workflow_steps(wf_id, load_output=False)
    assert trace.body_exit is not None
    step_end = trace.step_finished.get(0, trace.step_aborted.get(0))
    return {
        "ack_ms": (t_ack - t_cancel) * 1e3,
        "halt_ms": (max(trace.body_exit, t_ack) - t_cancel) * 1e3,
        "result_ms": (t_result - t_cancel) * 1e3,
        "cancel_at_ms_into_step": (t_cancel - step_start) * 1e3,
        "step_end_to_halt_ms": None if step_end is None else (trace.body_exit - step_end) * 1e3,
        "in_flight_completed": 0 in trace.step_finished,
        "in_flight_aborted": 0 in trace.step_aborted,
        # whether DBOS checkpointed the in-flight step's output (else a resume would re-run it)
        "in_flight_checkpointed": any("sleep_step" in s["function_name"] for s in recorded_steps),
        # the cancel only counts as "inside the step" if the step had not ended yet
        "cancel_inside_step": step_end is None or step_end > t_cancel,
        "steps_started_after_cancel": sorted(
            i for i, t in trace.step_started.items() if t > t_cancel
        ),
        "final_status": status,
        "halted": status == "CANCELLED" and set(trace.step_started) == {0},
        "result_error": result_error,
        "body_exit_error": trace.body_exit_error,
    }


def cancel_to_halt(
    step_seconds: float,
    trials: int,
    *,
    variants: Sequence[str] | None = None,
    window: tuple[float, float] = (0.05, 0.95),
    parallel: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Cancel-to-halt latency of a DBOS workflow whose (async, sleeping) step is in flight.

    Why: Stopline's claim is that a stop lands in milliseconds whatever the step is doing. DBOS's
    ``cancel_workflow`` only flips the workflow's row to CANCELLED (and clears its owner); the
    running workflow finds out when it next touches the database - in practice when the step in
    flight returns and its checkpoint write is refused (``DBOSWorkflowConflictIDError``: the
    step's output is *not* recorded, so a resume would re-run it), or at the next step's
    checkpoint read (``DBOSWorkflowCancelledError``) if the step's write won the race. Async steps
    declared ``preemptible=True`` are also cut by a per-event-loop poller that reads the status
    once a second. This measures both behaviours.

    Each trial starts ``stopline_bench.sleep_wf`` (3 sequential async steps that each
    ``asyncio.sleep(step_seconds)``), waits until step 0 has started, sleeps until a uniformly
    random moment ``window`` (fractions of the step) into it, then from the driving thread calls
    ``DBOS.cancel_workflow(id)`` and records:

    * ``ack_ms`` - how long ``cancel_workflow`` took to return (the stop acknowledgment; when it
      returns the CANCELLED status is committed in PostgreSQL);
    * ``halt_ms`` - cancel call -> *halted*. "Halted" is detected from inside the workflow: the
      workflow function records (``perf_counter``) the instant its body stops executing, i.e.
      the moment the exception DBOS raises into it (see above) leaves the step loop - at that
      point the in-flight step has finished or been cancelled. The trial then waits 50 ms more,
      reads the status back from DBOS (must be ``CANCELLED``) and checks that no step other
      than step 0 ever started; both together give the per-trial ``halted`` flag (counted in
      ``not_halted_count``). The body being a returned coroutine, no later step can start.
      Halt is never counted earlier than the ack;
    * ``result_ms`` - cancel call -> a client blocked in ``handle.get_result()`` gets the
      cancelled error (the nearest DBOS equivalent of "client receives the terminal event");
    * ``in_flight_completed`` - whether step 0's sleep ran to its end (``True``) or was cut;
      ``in_flight_checkpointed_count`` says how often its output was recorded anyway.

    Variants: ``"boundary"`` (plain async steps) and, if the installed DBOS has it,
    ``"preemptible"`` (``@DBOS.step(preemptible=True)``). Trials of long steps (5 s and more)
    run concurrently (``parallel`` defaults to all trials of all variants at once) so that
    30-second steps cost about one step of wall time; shorter steps run one trial at a time,
    alternating variants. Returns raw per-trial samples and median/p99 per metric and variant.
    """
    _register()
    rng = random.Random(seed)
    supported = ["boundary"] + (["preemptible"] if _REG.preemptible_supported else [])
    chosen = list(variants) if variants is not None else supported
    unsupported = [v for v in chosen if v not in supported]
    chosen = [v for v in chosen if v in supported]
    jobs = [(v, i) for i in range(trials) for v in chosen]
    if parallel is None:
        parallel = len(jobs) if step_seconds >= 5.0 else 1
    parallel = max(1, min(parallel, len(jobs) or 1))
    rngs = [random.Random(rng.random()) for _ in jobs]

    t_begin = time.perf_counter()
    with _dbos_session() as setup:
        # Warm the pool/connection and code paths so the first trial isn't an outlier.
        _one_cancel_trial(0.05, False, (0.5, 0.5), random.Random(0))
        if parallel == 1:
            results = [
                _one_cancel_trial(step_seconds, v == "preemptible", window, r)
                for (v, _), r in zip(jobs, rngs, strict=True)
            ]
        else:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                futures = [
                    pool.submit(_one_cancel_trial, step_seconds, v == "preemptible", window, r)
                    for (v, _), r in zip(jobs, rngs, strict=True)
                ]
                results = [f.result() for f in futures]

    out_variants: dict[str, Any] = {}
    for v in chosen:
        rows = [r for (vv, _), r in zip(jobs, results, strict=True) if vv == v]
        metrics = {
            key: [float(r[key]) for r in rows]
            for key in ("ack_ms", "halt_ms", "result_ms", "cancel_at_ms_into_step")
        }
        out_variants[v] = {
            **metrics,
            "step_end_to_halt_ms": [r["step_end_to_halt_ms"] for r in rows],
            "in_flight_completed": [r["in_flight_completed"] for r in rows],
            "summary": {
                k: summarize(s) for k, s in metrics.items() if k != "cancel_at_ms_into_step"
            },
            "in_flight_completed_count": sum(r["in_flight_completed"] for r in rows),
            "in_flight_aborted_count": sum(r["in_flight_aborted"] for r in rows),
            "in_flight_checkpointed_count": sum(r["in_flight_checkpointed"] for r in rows),
            "not_halted_count": sum(not r["halted"] for r in rows),
            "cancel_outside_step_count": sum(not r["cancel_inside_step"] for r in rows),
            "steps_started_after_cancel_count": sum(
                len(r["steps_started_after_cancel"]) for r in rows
            ),
            "final_status": sorted({str(r["final_status"]) for r in rows}),
            "result_errors": sorted({str(r["result_error"]) for r in rows}),
            "body_exit_errors": sorted({str(r["body_exit_error"]) for r in rows}),
        }
    return {
        "peer": "dbos",
        "scenario": "cancel_to_halt",
        "dbos_version": dbos_version(),
        "step_seconds": step_seconds,
        "trials": trials,
        "parallel": parallel,
        "cancel_window": list(window),
        "preemptible_supported": _REG.preemptible_supported,
        "unsupported_variants": unsupported,
        "variants": out_variants,
        "setup": setup,
        "wall_s": time.perf_counter() - t_begin,
    }


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

    reg = _register()
    workflows = {"sync": reg.noop_wf_sync, "async": reg.noop_wf_async}
    out: dict[str, Any] = {}
    t_begin = time.perf_counter()
    with _dbos_session() as setup:
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
            out[v] = {"per_step_ms": samples, "summary": summarize(samples)}
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

    reg = _REG
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
    traces = {wid: _TRACER.get(wid) for wid in ids}
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
    reg = _register()
    if preemptible and not reg.preemptible_supported:
        raise ValueError(f"dbos {dbos_version()} has no preemptible steps")
    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    t_begin = time.perf_counter()
    with _dbos_session() as setup:
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
            _TRACER.reset()
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
            "wall_ms": summarize(wall),
            "cancel_ack_ms": summarize(acks),
            "cancel_halt_ms": summarize(halts),
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
