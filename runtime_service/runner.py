"""The step loop: runs each operation's steps, checkpoints them, and halts on a stop.

A stop reaches a running operation two ways, and either is enough on its own:
- at every step boundary: beginning a step (`start_step`, or `advance` which checkpoints one step
  and begins the next in one transaction) is a conditional write that refuses once a stop is
  recorded, and `complete` refuses to complete an operation whose stop came first;
- mid-step: `deliver_stop` resolves the run's stop future, the loop cancels the agent's step
  coroutine at once and gives it `stop_grace` seconds to clean up, then records INTERRUPTED.
  On PostgreSQL a stop recorded by another replica arrives as a notification; the lease loop's
  periodic look at the stored stop intent is the fallback. Output is refused once a stop is
  recorded, so an agent emitting before the stop reached this runner learns of it that way.

What a step writes while it runs (output, token deltas, agent events, tool calls) goes through its
StepEvents (step_events.py). Whatever way the step ends, the runner closes them before its next
write: buffered deltas are written and every tool call still open gets its one ending (cancelled
by the stop, or failed), so all of it lands before the boundary, the failure or the halt.

Ownership: a runner runs an operation under a lease it renews; every write it makes is
conditional on still owning it. Work is claimed by a claim loop (woken by notifications, a
finished run, or its poll timer), never more than `max_running` at once.

Cancelling a run because of shutdown, a lost lease or a lost database is not a stop: nothing
terminal is written, the operation stays RUNNING, and whoever claims it next resumes it from its
last checkpoint.

Waiting for a person (storage/waiting.py): a step that returns `ask` ends the run: the boundary
write checkpoints it, stores the request and leaves the operation WAITING with no runner, so the
slot and the coroutine are freed at once. An answer (or an expiry, swept by every replica's sweep
loop every poll_seconds, apart from the lease loop so it never delays a renewal) makes it
PENDING, and whichever runner claims it gives the answer to the next step (StepContext.answer).
A pause travels like a stop (the same notification channel, marked, and the lease loop's look at
the stored intent) and cuts the step the same way; only the last write differs: `pause_halt`
leaves the operation PAUSED instead of INTERRUPTED, keeping the last checkpoint (a resume reruns
the cut step as a new attempt).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from opentelemetry import trace
from prometheus_client import Histogram

from runtime_service import metrics, run_telemetry, stop_causes, waiting
from runtime_service.agents.base import (
    Agent,
    Answered,
    InputRequest,
    StepContext,
    StepFailed,
    StepResult,
)
from runtime_service.agents.registry import AgentRegistry
from runtime_service.domain import Event, EventKind, InterruptOutcome, JSONValue, Operation
from runtime_service.hub import EventHub
from runtime_service.notifications import PAUSE_MARK
from runtime_service.step_events import DeltaSettings, OperationHalted, StepEvents
from runtime_service.storage import (
    STORAGE_FAILURES,
    Appended,
    ClaimBatch,
    Claimed,
    KeptState,
    Storage,
)
from runtime_service.tools import ToolRegistry
from runtime_service.tools.toolbox import ToolBox
from stopline import logs, tracing
from stopline.json_values import shown

log = logging.getLogger(__name__)
W = TypeVar("W")

__all__ = ["OperationHalted", "Runner", "RunnerSettings"]


@dataclass(eq=False)
class _Run:
    operation_id: str
    stop: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    step_task: asyncio.Task[StepResult] | None = field(default=None, repr=False)
    # Claimed (its lease is ours to renew). Until then the lease loop leaves it alone: a run
    # whose claim is still in flight is not "lost" when renewal does not find it.
    owned: bool = False
    # When this runner learned of the committed stop, if it did so at once (see deliver_stop).
    stop_seen_at: datetime | None = None
    # Stops the operation at its deadline (armed once the run owns it, see _arm_deadline).
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


def _json_error(value: JSONValue) -> str | None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)
    return None


class Runner:
    def __init__(
        self,
        storage: Storage,
        agents: AgentRegistry,
        hub: EventHub,
        settings: RunnerSettings,
        tools: ToolBox | None = None,
        meters: metrics.RuntimeMetrics | None = None,
    ) -> None:
        self.metrics = meters or metrics.RuntimeMetrics()
        self._storage = storage
        self._tools = tools or ToolBox(ToolRegistry.load(use_entry_points=False))
        self._agents = agents
        self._hub = hub
        self.settings = settings
        self.runner_id = settings.runner_id
        self._runs: dict[str, _Run] = {}
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._wake_claimer = asyncio.Event()
        self._wake_leases = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._closed = False
        self.metrics.count_running(self._runs.__len__)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Begin claiming work and renewing leases."""
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim loop"),
            asyncio.create_task(self._lease_loop(), name="lease loop"),
            asyncio.create_task(self._sweep_loop(), name="input expiry loop"),
        ]
        # Counted only when scraped, on this loop (see metrics.StoredOperations).
        self.metrics.stored.bind(asyncio.get_running_loop(), self._storage.count_unfinished)

    def submit(self, operation_id: str) -> None:
        """Fast path for an operation started here: run it now if there is room; otherwise
        it stays PENDING and the claim loop (here or on another replica) takes it later."""
        if operation_id in self._runs or self._closed:
            return  # shutting down: it stays PENDING for another replica or the next start
        if len(self._runs) >= self.settings.max_running:
            self.wake()
            return
        self._launch(operation_id, None)

    def wake(self) -> None:
        """Look for claimable work now (a notification, a freed slot, a reconnect)."""
        self._wake_claimer.set()

    def check_stops_now(self) -> None:
        """Re-read stored stop intents now (after notifications may have been missed)."""
        self._wake_leases.set()

    def deliver_stop(
        self, operation_id: str, seen_at: datetime | None = None, cause: str | None = None
    ) -> bool:
        """Wake the loop of an operation this runner runs; False if it runs nothing by that id
        (the stop is still recorded in storage, where the boundary check finds it).

        `seen_at`: a time just after the stop committed (the recording replica's own, taken
        right after its commit, or the arrival of the stop's notification), from which halt_ms
        is measured; None when the stop was found later (the periodic re-read): halt_ms then
        runs from the stored stop time."""
        run = self._runs.get(operation_id)
        if run is None:
            return False
        self._stop(run, seen_at, cause)
        return True

    def stop_notified(self, operation_id: str) -> None:
        """A stop's (or a pause's, marked) notification arrived (sent on its commit)."""
        if operation_id.startswith(PAUSE_MARK):
            self.deliver_pause(operation_id[len(PAUSE_MARK) :])
            return
        self.deliver_stop(operation_id, datetime.now(UTC))

    def deliver_pause(self, operation_id: str) -> bool:
        """Cut the step of an operation this runner runs, for a recorded pause; False if it
        runs nothing by that id (the lease loop's look at the stored intent finds it)."""
        run = self._runs.get(operation_id)
        if run is None:
            return False
        if not run.stop.done():
            run.pausing = True
        self._stop(run, None)
        return True

    @staticmethod
    def _stop(run: _Run, seen_at: datetime | None, cause: str | None = None) -> None:
        """`cause`: the stop's metrics label, when known (runtime_service/metrics.py). It is
        kept even when the stop arrived first without it (PostgreSQL's notification can beat the
        recording call's own return by a moment)."""
        if cause is not None and run.cause == metrics.CAUSE_UNKNOWN:
            run.cause = cause
        if not run.stop.done():
            run.stop_learned = time.monotonic()
            run.stop_seen_at = seen_at
            run.stop.set_result(None)
            run.stopped_span = run.step_span if run.step_span is not None else run.span
            run_telemetry.stop_received(run.stopped_span, run.cause)
        # Also when the stop reached the run first by another way (PostgreSQL's notification
        # can beat the recording call's own delivery): the call still links to what it cut.
        run_telemetry.link_stop(run.stopped_span)

    @property
    def has_room(self) -> bool:
        """Whether an operation submitted now would run here at once."""
        return not self._closed and len(self._runs) < self.settings.max_running

    async def wait_finished(self, operation_id: str) -> None:
        """Until this runner no longer runs the operation (for tests and shutdown)."""
        run = self._runs.get(operation_id)
        if run is not None and run.task is not None:
            await asyncio.wait({run.task})

    async def shutdown(self) -> None:
        """Stop claiming, cancel every run without recording anything, and hand the leases
        back so another replica (or the next start) resumes the operations at once."""
        if self._closed:
            return
        self._closed = True
        self.metrics.stored.unbind()
        for loop in self._loops:
            loop.cancel()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for task in [*self._loops, *tasks]:
            task.cancel()
        if self._loops or tasks:
            await asyncio.wait([*self._loops, *tasks])
        try:
            await self._storage.drop_leases(self.runner_id)
        except STORAGE_FAILURES as exc:
            log.warning("could not hand back leases (%s); they will expire", exc)

    # ------------------------------------------------------------------ claiming and leases

    def _launch(self, operation_id: str, claimed: Claimed | None) -> None:
        if self._closed:
            return
        run = _Run(operation_id, asyncio.get_running_loop().create_future())
        self._runs[operation_id] = run
        run.task = asyncio.create_task(self._run(run, claimed), name=f"operation {operation_id}")
        run.task.add_done_callback(partial(self._forget, run))

    def _forget(self, run: _Run, task: asyncio.Task[None]) -> None:
        was_full = len(self._runs) >= self.settings.max_running
        if self._runs.get(run.operation_id) is run:
            del self._runs[run.operation_id]
        if was_full:
            # A slot opened where the claim loop had none: look for work that waited for one.
            # (Below capacity the loop already claims whatever becomes claimable.)
            self.wake()
        if not task.cancelled() and task.exception() is not None:
            log.error("operation %s: runner crashed", run.operation_id, exc_info=task.exception())

    async def _claim_loop(self) -> None:
        while True:
            free = self.settings.max_running - len(self._runs)
            if free > 0:
                try:
                    batch = await self._storage.claim_next(
                        self.runner_id, free, self.settings.lease_seconds, list(self._runs)
                    )
                except STORAGE_FAILURES as exc:
                    log.warning("claiming work failed (%s); retrying", exc)
                else:
                    self._publish(batch.finished)
                    self._count_takeovers(batch)
                    for claimed in batch.claimed:
                        self._launch(claimed.operation.id, claimed)
                    if len(batch.claimed) == free:
                        continue  # there may be more
            self._wake_claimer.clear()
            try:
                async with asyncio.timeout(self.settings.poll_seconds):
                    await self._wake_claimer.wait()
            except TimeoutError:
                pass

    def _count_takeovers(self, batch: ClaimBatch) -> None:
        takeover = self.metrics.takeover
        for event in batch.finished:
            if event.is_terminal:
                takeover["halted"].inc()
        for claimed in batch.claimed:
            data = claimed.event.data
            if isinstance(data, dict) and data.get("resumed") is True:
                takeover["resumed"].inc()

    async def _lease_loop(self) -> None:
        interval = min(self.settings.poll_seconds, self.settings.lease_seconds / 3)
        while True:
            self._wake_leases.clear()
            try:
                async with asyncio.timeout(interval):
                    await self._wake_leases.wait()
            except TimeoutError:
                pass
            owned = {op_id: run for op_id, run in self._runs.items() if run.owned}
            try:
                kept, stopping = await self._storage.renew_leases(
                    self.runner_id, list(owned), self.settings.lease_seconds
                )
            except STORAGE_FAILURES as exc:
                log.warning("renewing leases failed (%s); retrying", exc)
                continue
            for operation_id in stopping:
                await self._deliver_stored(operation_id)  # the fallback for a missed notification
            for operation_id in set(owned) - kept:
                # Finished meanwhile, or taken over after our lease lapsed. Our own writes are
                # fenced and will be refused; cancel the step in flight so the agent's work
                # never runs on two replicas at once.
                run = owned[operation_id]
                if self._runs.get(operation_id) is not run:
                    continue  # ended meanwhile
                if run.step_task is not None and not run.step_task.done():
                    log.warning("operation %s: lease lost; abandoning its step", operation_id)
                    run.step_task.cancel()

    async def _deliver_stored(self, operation_id: str) -> None:
        """Deliver the stored intent (stop or pause) of an operation this runner runs."""
        run = self._runs.get(operation_id)
        if run is None or run.stop.done():
            return
        try:
            operation = await self._storage.get(operation_id)
        except STORAGE_FAILURES as exc:
            log.warning("reading a stored stop intent failed (%s); retrying", exc)
            return
        if operation is None or operation.stop is not None:
            self.deliver_stop(operation_id)
        elif operation.pause_requested_at is not None:
            self.deliver_pause(operation_id)

    async def _sweep_loop(self) -> None:
        """Its own loop, so that a slow sweep never delays a lease renewal."""
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            await self._expire_requests()

    async def _expire_requests(self) -> None:
        """Resolve input requests past their expiry (every replica sweeps; each resolution is a
        compare-and-set), and look for the work they made claimable; stop waiting operations
        past their deadline."""
        try:
            expired = await self._storage.expire_requests()
            overdue = await self._storage.overdue_waiting()
            for operation in overdue:
                # Nobody owns it to arm its deadline: the stop is recorded here, and ends it
                # at once (no step is in flight).
                assert operation.deadline_at is not None
                seconds = (operation.deadline_at - operation.created_at).total_seconds()
                cause = stop_causes.deadline_exceeded(seconds)
                stopped = await self._storage.record_stop(
                    operation.id, cause.requested_by, cause.reason, cause.cause
                )
                if stopped is not None:
                    self._publish(list(stopped.events))
        except STORAGE_FAILURES as exc:
            log.warning("expiring input requests failed (%s); retrying", exc)
            return
        if expired:
            self._publish(expired)
            self.wake()

    # ------------------------------------------------------------------ the loop

    async def _write(self, operation_id: str, write: Awaitable[W]) -> W:
        """A write of this runner, whose events are published here once it has committed."""
        with self._hub.local_write(operation_id):
            written = await write
            self._publish(written)
        return written

    def _publish(self, events: Any) -> None:
        """The events a committed write reports (an Event, a list of them, or an Appended)."""
        if not events:
            return
        if isinstance(events, Appended):
            events = events.event
        events = [events] if isinstance(events, Event) else events
        self._count(events)
        self._hub.publish(events)

    def _count(self, events: list[Event]) -> None:
        """Metrics of committed events: counter increments only (no I/O, no lock)."""
        meters = self.metrics
        by_kind = meters.event_kind
        for event in events:
            by_kind[event.kind].inc()
            if event.is_terminal:
                run = self._runs.get(event.operation_id)
                cause = metrics.CAUSE_NONE
                if event.kind is EventKind.INTERRUPTED:
                    # The halt records the stop's cause; older stops have none.
                    recorded = event.data.get("cause") if isinstance(event.data, dict) else None
                    cause = stop_causes.label(recorded if isinstance(recorded, str) else None)
                    if cause == stop_causes.CAUSE_UNKNOWN and run is not None:
                        cause = run.cause
                agent = run.agent if run is not None else metrics.AGENT_UNKNOWN
                meters.finished.labels(agent, event.kind.value, cause).inc()
                run_telemetry.finished(event, cause, run.span if run is not None else None)
            elif event.kind in meters.tool_outcome:
                meters.tool_outcome[event.kind].inc()

    async def _run(self, run: _Run, claimed: Claimed | None) -> None:
        op_id = run.operation_id
        logs.bind(operation_id=op_id)  # this task's lines are about this operation
        begun: Event | None = None  # the first step's step_started, when claimed with it
        try:
            if claimed is None:
                # Started here: claimed with its first step begun, in one write.
                lease = self.settings.lease_seconds
                with self._hub.local_write(op_id):
                    taken = await self._storage.claim_and_start(op_id, self.runner_id, lease)
                    if taken is None:
                        return  # taken elsewhere, held, finished, or stopped before it started
                    claimed, begun = taken
                    self._publish([claimed.event, begun])
            else:
                self._publish([claimed.event, *claimed.settled])
            run.owned = True
            operation = claimed.operation
            agent = self._agents.get(operation.agent)
            # Only registered names label the metrics: the set stays closed.
            run.agent = operation.agent if agent is not None else metrics.AGENT_UNKNOWN
            run.span = run_telemetry.operation_span(operation, run.agent)
            logs.bind(principal=operation.owner or None)
            with trace.use_span(
                run.span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                # In the run's span: the claim loop's task, which may have launched it, has none.
                log.info(
                    "operation started",
                    extra=logs.fields(agent=run.agent, step=operation.steps_completed),
                )
                self._arm_deadline(run, operation)
                self.metrics.started.labels(run.agent).inc()
                if agent is None:
                    message = f"agent {shown(operation.agent)} is not registered with this runtime"
                    step = operation.steps_completed
                    await self._write(
                        op_id, self._storage.fail(op_id, step, message, self.runner_id)
                    )
                    return
                await self._loop(run, agent, operation, begun)
        except STORAGE_FAILURES as exc:
            # Never guess an outcome without the database: leave the operation RUNNING; once
            # our lease lapses it is claimed again and resumed from its last checkpoint.
            log.warning(
                "operation %s: database unavailable (%s); leaving it for recovery", op_id, exc
            )
        finally:
            if run.deadline is not None:
                run.deadline.cancel()
            if run.step_task is not None and not run.step_task.done():
                run.step_task.cancel()  # shutdown or lost ownership: do not leave the agent running

    async def _loop(
        self, run: _Run, agent: Agent, operation: Operation, started: Event | None = None
    ) -> None:
        """Run the operation's steps from its last checkpoint; `started`: the first of them was
        begun already (claimed together)."""
        op_id = operation.id
        me = self.runner_id
        step = operation.steps_completed
        state = operation.agent_state
        storage = self._storage
        if started is None:
            if not run.stop.done() and _budget_spent(operation, step):
                assert operation.max_steps is not None
                await self._stop_self(run, stop_causes.step_budget_exhausted(operation.max_steps))
            if run.stop.done():
                await self._halt(run, step, mid_step=False)
                return
            # The first step of a run is begun on its own; every later one is begun in the same
            # transaction that checkpoints the step before it (one write per step boundary).
            started = await self._write(op_id, storage.start_step(op_id, step, me))
        while True:
            if started is None:
                # A stop was recorded (or the operation ended or moved) before this step began.
                await self._halt(run, step, mid_step=False)
                return
            if run.stop.done():
                # Stopped after the step was recorded as begun, before the agent ran it.
                await self._halt(run, step, mid_step=True)
                return

            events = self._step_events(run, step)
            unknown = await self._unknown_calls(op_id, step, started)
            answer = await self._answer(operation, step)
            ctx = StepContext(op_id, step, operation.input, state, events, unknown, answer)
            step_span = run.step_span = run_telemetry.step_span(op_id, run.agent, step)
            # The step's task runs in a copy of this context with the step span current: its
            # spans (tool calls, model requests) are the step span's children.
            step_task = asyncio.create_task(
                agent.step(ctx),
                name=f"operation {op_id} step {step}",
                context=tracing.context_with_span(step_span),
            )
            run.step_task = step_task
            try:
                written = await self._after_step(run, step, step_task, events, ctx, operation)
            finally:
                run.step_span = None
                step_span.end()
            if written is None:
                return
            step += 1
            state = written[0]
            started = written[1]

    async def _after_step(
        self,
        run: _Run,
        step: int,
        step_task: asyncio.Task[StepResult],
        events: StepEvents,
        ctx: StepContext,
        operation: Operation,
    ) -> tuple[JSONValue, Event | None] | None:
        """Wait for the step (or the stop that cuts it) and write its boundary: the next step's
        state and its step_started event (None: stopped before it began), or None when the
        operation ended or is no longer this runner's."""
        op_id = run.operation_id
        me = self.runner_id
        storage = self._storage
        step_span = run.step_span or trace.INVALID_SPAN
        either: set[asyncio.Future[Any]] = {step_task, run.stop}
        if not self.settings.abort_mid_step:
            either = {step_task}
        step_began = time.monotonic()
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if run.step_seconds is None:
            run.step_seconds = self.metrics.steps.labels(run.agent)
        run.step_seconds.observe(time.monotonic() - step_began)
        if run.stop.done() and self.settings.abort_mid_step and not _returned(step_task):
            # Cut by the stop: still running, or ended by it (its output was refused, see
            # _emit) or in its wake. A step that returned in time is checkpointed below.
            step_span.set_attribute(run_telemetry.STEP_OUTCOME, "stopped")
            if not step_task.done():
                await self._cancel_step(op_id, step_task)
            if run.stop_learned is not None:
                cancelled = time.monotonic() - run.stop_learned
                self.metrics.stop_to_cancelled.observe(cancelled)
            # Deltas passed before the stop reached the step, then the calls it cut.
            await events.close(stopping=True)
            kept = self._kept(op_id, ctx)
            await self._halt(run, step, mid_step=True, kept=kept)
            return None
        run.step_task = None

        lost = None if step_task.cancelled() else step_task.exception()
        if isinstance(lost, STORAGE_FAILURES):
            raise lost  # the step failed because storage did: not the agent's failure
        await events.close(stopping=False)
        failure = self._failure(step_task)
        if failure is not None:
            step_span.set_attribute(run_telemetry.STEP_OUTCOME, "failed")
            step_span.set_status(trace.StatusCode.ERROR, "the step failed")
            log.info("step failed", extra=logs.fields(step=step, error=failure[:300]))
            await self._write(op_id, storage.fail(op_id, step, failure, me))
            return None
        result = step_task.result()
        if result.ask is not None and not result.done:
            step_span.set_attribute(run_telemetry.STEP_OUTCOME, "asked")
            await self._ask(run, step, result, result.ask)
            return None
        step_span.set_attribute(run_telemetry.STEP_OUTCOME, "done" if result.done else "returned")
        if result.done:
            written = await self._write(
                op_id, storage.complete(op_id, step, result.output, result.state, me)
            )
            if written and not written[-1].is_terminal:
                # The last step finished but a stop was recorded first: the stop wins.
                await self._halt(run, step + 1, mid_step=False)
            return None
        if _budget_spent(operation, step + 1):
            # The budget is spent and the operation is not done: the stop is recorded before
            # the boundary write, which then checkpoints this step and begins no other.
            assert operation.max_steps is not None
            await self._stop_self(run, stop_causes.step_budget_exhausted(operation.max_steps))
        written = await self._write(
            op_id, storage.advance(op_id, step, result.output, result.state, me)
        )
        if not written:
            return None  # no longer ours: whoever owns it now carries on
        return result.state, written[1] if len(written) > 1 else None

    # ------------------------------------------------------------------ waiting for a person

    async def _ask(self, run: _Run, step: int, result: StepResult, request: InputRequest) -> None:
        """End the run with the step's question: the operation WAITS, holding nothing here."""
        op_id = run.operation_id
        stored = waiting.new_request(step, request, self.settings.input_expiry_seconds)
        written = await self._write(
            op_id,
            self._storage.ask(op_id, step, result.output, result.state, stored, self.runner_id),
        )
        if len(written) == 1:
            # A stop was recorded first: the step is checkpointed and the stop wins here.
            await self._halt(run, step + 1, mid_step=False)

    async def _answer(self, operation: Operation, step: int) -> Answered | None:
        """The resolution of the request the step before `step` ended with, if it asked (only
        the first step of a run can follow a question: asking ends the run)."""
        request_id = operation.input_request_id
        if request_id is None or step != operation.steps_completed:
            return None
        stored = await self._storage.input_request(operation.id, request_id)
        if stored is None or stored.step != step - 1:
            return None
        return waiting.answered(stored)

    # ------------------------------------------------------------------ limits

    def _arm_deadline(self, run: _Run, operation: Operation) -> None:
        """Stop the operation at its stored deadline; armed by whichever runner owns it (at
        claim, or at takeover from the same column), at once when the deadline is past."""
        if operation.deadline_at is None or operation.status.is_terminal:
            return
        deadline = (operation.deadline_at - operation.created_at).total_seconds()
        cause = stop_causes.deadline_exceeded(deadline)
        timer = self._deadline_timer(run, operation.deadline_at, cause)
        run.deadline = asyncio.create_task(timer, name=f"operation {run.operation_id} deadline")

    async def _deadline_timer(
        self, run: _Run, deadline_at: datetime, cause: stop_causes.RuntimeStop
    ) -> None:
        await asyncio.sleep(max(0.0, (deadline_at - datetime.now(UTC)).total_seconds()))
        while not run.stop.done():
            try:
                await self._stop_self(run, cause)
            except STORAGE_FAILURES as exc:
                log.warning(
                    "operation %s: recording its deadline stop failed (%s)", run.operation_id, exc
                )
                await asyncio.sleep(self.settings.poll_seconds)
            else:
                return

    async def _stop_self(self, run: _Run, cause: stop_causes.RuntimeStop) -> None:
        """Record a stop the runtime requests (a limit was reached) through the same write as
        a user's stop, and deliver it to this run at once."""
        op_id = run.operation_id
        with self._hub.local_write(op_id):
            result = await self._storage.record_stop(
                op_id, cause.requested_by, cause.reason, cause.cause
            )
            committed = datetime.now(UTC)
            if result is None:
                return
            self._publish(list(result.events))
        if not result.operation.status.is_terminal:
            ours = result.outcome is InterruptOutcome.ACCEPTED  # else a stop came first
            self._stop(
                run, committed if ours else None, stop_causes.label(cause.cause) if ours else None
            )

    @staticmethod
    def _kept(op_id: str, ctx: StepContext) -> KeptState | None:
        """The state the cut step kept for a stop, if any and if JSON can store it."""
        if ctx.kept is None:
            return None
        problem = _json_error(ctx.kept.state)
        if problem is not None:
            log.warning("operation %s: keep_on_stop state not stored: %s", op_id, problem)
            return None
        return KeptState(ctx.kept.state)

    @staticmethod
    def _failure(step_task: asyncio.Task[StepResult]) -> str | None:
        if step_task.cancelled():
            return "the step was cancelled by the agent itself"
        exc = step_task.exception()
        if isinstance(exc, StepFailed):
            return exc.message
        if exc is not None:
            return f"{type(exc).__name__}: {exc}"
        result: object = step_task.result()
        if not isinstance(result, StepResult):
            return f"step returned {type(result).__name__}, expected StepResult"
        for what, value in (("state", result.state), ("output", result.output)):
            problem = _json_error(value)
            if problem is not None:
                return f"step returned a {what} that is not JSON-serialisable: {problem}"
        return None

    async def _cancel_step(self, op_id: str, step_task: asyncio.Task[StepResult]) -> None:
        step_task.cancel()
        done, _ = await asyncio.wait({step_task}, timeout=self.settings.stop_grace)
        if not done:
            log.warning(
                "operation %s: the agent ignored cancellation for %.1fs; abandoning its step",
                op_id,
                self.settings.stop_grace,
            )
            self._abandoned.add(step_task)
            step_task.add_done_callback(self._abandoned.discard)
        elif not step_task.cancelled() and step_task.exception() is not None:
            log.info(
                "operation %s: step raised while being cancelled: %r", op_id, step_task.exception()
            )

    async def _halt(
        self, run: _Run, step: int, *, mid_step: bool, kept: KeptState | None = None
    ) -> None:
        op_id = run.operation_id
        if run.pausing:
            paused = self._storage.pause_halt(op_id, step, mid_step, self.runner_id)
            if await self._write(op_id, paused) is not None:
                return
            # Refused: a stop was recorded meanwhile (it wins), or the operation is not ours
            # (then the halt below is refused too).
        halted = self._storage.halt(op_id, step, mid_step, self.runner_id, run.stop_seen_at, kept)
        written = await self._write(op_id, halted)
        if written is not None and run.stop_learned is not None:
            self.metrics.stop_to_interrupted.observe(time.monotonic() - run.stop_learned)

    async def _unknown_calls(self, op_id: str, step: int, started: Event) -> frozenset[str]:
        """The calls of `step`'s earlier attempts settled outcome unknown (StepContext
        .unknown_calls). Only a rerun can have any, so only a rerun reads the log for them."""
        attempt = started.data.get("attempt", 1)
        if not isinstance(attempt, int) or attempt <= 1:
            return frozenset()
        unknown: set[str] = set()
        after = 0
        while True:
            page = await self._storage.events_after(op_id, after)
            for event in page:
                if (
                    event.kind is EventKind.TOOL_CALL_OUTCOME_UNKNOWN
                    and event.data.get("step") == step
                ):
                    unknown.add(str(event.data["call_id"]))
            if not page or page[-1].seq >= started.seq:
                return frozenset(unknown)
            after = page[-1].seq

    def _step_events(self, run: _Run, step: int) -> StepEvents:
        """The StepContext's events for `step`: see step_events for deltas and tool calls."""
        return StepEvents(
            operation_id=run.operation_id,
            step=step,
            runner_id=self.runner_id,
            storage=self._storage,
            write=partial(self._write, run.operation_id),
            stopped=run.stop.done,
            on_stop=partial(self._stop, run, None),
            deltas=self.settings.deltas,
            tools=self._tools,
            abort_mid_step=self.settings.abort_mid_step,
            on_flush=self.metrics.deltas_per_event.observe,
        )


def _budget_spent(operation: Operation, steps_completed: int) -> bool:
    """No further step may begin once this many steps completed."""
    return operation.max_steps is not None and steps_completed >= operation.max_steps


def _returned(step_task: asyncio.Task[StepResult]) -> bool:
    """The step ran to its end and returned (rather than raised or was cancelled)."""
    return step_task.done() and not step_task.cancelled() and step_task.exception() is None
