"""DBOS peer, scenario 1: how fast ``DBOS.cancel_workflow`` stops a workflow mid-step."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.peers.dbos_session import (
    REG,
    SETTLE_S,
    TRACER,
    dbos_session,
    dbos_version,
    register,
    status_of,
)
from bench.stats import summary_interpolated

# --------------------------------------------------------------------------------------------
# 1. Cancel-to-halt
# --------------------------------------------------------------------------------------------

_STEPS_PER_CANCEL_TRIAL = 3  # the cancel lands in step 0; steps 1 and 2 must never start


def _one_cancel_trial(
    step_seconds: float, preemptible: bool, window: tuple[float, float], rng: random.Random
) -> dict[str, Any]:
    """Start a workflow, cancel it at a random moment of its first step, and time the halt."""
    from dbos import DBOS, SetWorkflowID

    reg = REG
    wf_id = f"cancel-{uuid.uuid4()}"
    fraction = rng.uniform(*window)
    with SetWorkflowID(wf_id):
        # An async workflow started from a plain thread runs on DBOS's background event loop, so
        # this thread is free to play the client and call the synchronous cancel_workflow.
        handle = DBOS.start_workflow(
            reg.sleep_wf, _STEPS_PER_CANCEL_TRIAL, step_seconds, preemptible
        )
    wait_cap = 30.0 + 3 * step_seconds
    if not TRACER.wait_for(wf_id, lambda t: 0 in t.step_started, wait_cap):
        raise RuntimeError(f"step 0 of {wf_id} never started")
    step_start = TRACER.get(wf_id).step_started[0]
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

    if not TRACER.wait_for(wf_id, lambda t: t.body_exit is not None, wait_cap):
        raise RuntimeError(f"workflow {wf_id} body never exited")
    time.sleep(SETTLE_S)
    trace = TRACER.get(wf_id)
    status = status_of(wf_id)
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
    register()
    rng = random.Random(seed)
    supported = ["boundary"] + (["preemptible"] if REG.preemptible_supported else [])
    chosen = list(variants) if variants is not None else supported
    unsupported = [v for v in chosen if v not in supported]
    chosen = [v for v in chosen if v in supported]
    jobs = [(v, i) for i in range(trials) for v in chosen]
    if parallel is None:
        parallel = len(jobs) if step_seconds >= 5.0 else 1
    parallel = max(1, min(parallel, len(jobs) or 1))
    rngs = [random.Random(rng.random()) for _ in jobs]

    t_begin = time.perf_counter()
    with dbos_session() as setup:
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
                k: summary_interpolated(s)
                for k, s in metrics.items()
                if k != "cancel_at_ms_into_step"
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
        "preemptible_supported": REG.preemptible_supported,
        "unsupported_variants": unsupported,
        "variants": out_variants,
        "setup": setup,
        "wall_s": time.perf_counter() - t_begin,
    }
