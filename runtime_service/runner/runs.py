"""One run of an operation on this runner, the runner's settings, and how a stop (or a pause)
reaches a run: it resolves the run's stop future, which cuts the step in flight."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

from opentelemetry import trace
from prometheus_client import Histogram

from runtime_service import metrics, run_telemetry
from runtime_service.agents.base import StepResult
from runtime_service.domain import Operation
from runtime_service.step_events import DeltaSettings
from stopline.errors import Unavailable


@dataclass(eq=False)
class Run:
    operation_id: str
    stop: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    step_task: asyncio.Task[StepResult] | None = field(default=None, repr=False)
    # Claimed (its lease is ours to renew). Until then the lease loop leaves it alone: a run
    # whose claim is still in flight is not "lost" when renewal does not find it.
    owned: bool = False
    # When this runner learned of the committed stop, if it did so at once (see deliver_stop).
    stop_seen_at: datetime | None = None
    # Stops the operation at its deadline (armed once the run owns it, see Limits.arm_deadline).
    deadline: asyncio.Task[None] | None = field(default=None, repr=False)
    # For the metrics: when this runner learned of the stop (monotonic), what asked for it, and
    # the agent (once the run owns the operation).
    stop_learned: float | None = None
    cause: str = metrics.CAUSE_UNKNOWN
    agent: str = ""
    # Traces: this run's operation span, and the span of the step in flight (see tracing in
    # the README); a stop links its RPC's span to the step span it cuts.
    span: trace.Span = field(default=trace.INVALID_SPAN, repr=False)
    step_span: trace.Span | None = field(default=None, repr=False)
    # This run's child of stopline_runtime_step_seconds (bound once: it is observed per step).
    step_seconds: Histogram | None = field(default=None, repr=False)
    # The span the stop cut: the step's in flight when the stop first reached the run.
    stopped_span: trace.Span | None = field(default=None, repr=False)
    # The stop future was resolved by a pause: cut the step, but land PAUSED, not INTERRUPTED
    # (a stop recorded meanwhile still wins: pause_halt refuses, and the halt follows).
    pausing: bool = False
    # A held start's release that this run's first write makes (Runner.release): the claimed
    # operation, or None when it was not held, for the release call to answer with.
    released: asyncio.Future[Operation | None] | None = field(default=None, repr=False)
    # A stop cancels the step in flight (the runner's abort_mid_step), from the call that
    # resolves the stop (see `stop`).
    cut_on_stop: bool = True


@dataclass(frozen=True)
class RunnerSettings:
    runner_id: str
    stop_grace: float
    max_running: int
    lease_seconds: float
    poll_seconds: float
    # False: a stop waits for the step in flight and lands at the next boundary (the behaviour
    # Stopline replaces; kept as the benchmarks' baseline).
    abort_mid_step: bool = True
    # Token deltas are written as one event per this long or this many characters.
    deltas: DeltaSettings = field(default_factory=DeltaSettings)
    # An input request's expiry when its agent sets none.
    input_expiry_seconds: float = 86400.0


def stop(run: Run, seen_at: datetime | None, cause: str | None = None) -> None:
    """Resolve the run's stop future (once). `cause`: the stop's metrics label, when known
    (runtime_service/metrics.py). It is kept even when the stop arrived first without it
    (PostgreSQL's notification can beat the recording call's own return by a moment)."""
    if cause is not None and run.cause == metrics.CAUSE_UNKNOWN:
        run.cause = cause
    if not run.stop.done():
        run.stop_learned = time.monotonic()
        run.stop_seen_at = seen_at
        run.stop.set_result(None)
        run.stopped_span = run.step_span if run.step_span is not None else run.span
        run_telemetry.stop_received(run.stopped_span, run.cause)
        step = run.step_task
        if run.cut_on_stop and step is not None and not step.done():
            # Cancelled here, in the stop's own turn of the loop, the step unwinds in the next
            # one, alongside the step loop's wake-up. Left to the step loop (woken by the stop
            # future, then cancelling and waiting), it took two more turns before the halt's
            # write could begin. The step loop cancels only a step not cancelled yet
            # (steps.Steps._cancel_step), so the agent sees one cancellation, as before.
            step.cancel()
    # Also when the stop reached the run first by another way (PostgreSQL's notification
    # can beat the recording call's own delivery): the call still links to what it cut.
    run_telemetry.link_stop(run.stopped_span)


def answer_release(run: Run, outcome: Operation | BaseException | None) -> None:
    """Tell the release call waiting on this run's first write how it went (once). A run that
    ended without its write (cancelled at shutdown) answers UNAVAILABLE: retry the release."""
    released = run.released
    if released is None or released.done():
        return
    if isinstance(outcome, Exception):
        released.set_exception(outcome)
    elif isinstance(outcome, BaseException):
        released.set_exception(Unavailable("the runtime is shutting down; retry the release"))
    else:
        released.set_result(outcome)


def pause(run: Run) -> None:
    """Cut the run's step for a recorded pause: it lands PAUSED unless a stop came first."""
    if not run.stop.done():
        run.pausing = True
    stop(run, None)
