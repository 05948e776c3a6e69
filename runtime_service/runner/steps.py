"""The step loop of one run: runs the operation's steps, checkpoints them, and halts on a stop.

A stop reaches a running operation two ways, and either is enough on its own:
- at every step boundary: beginning a step (`start_step`, or `advance` which checkpoints one step
  and begins the next in one transaction) is a conditional write that refuses once a stop is
  recorded, and `complete` refuses to complete an operation whose stop came first;
- mid-step: the stop resolves the run's stop future (runs.stop), the loop cancels the agent's
  step coroutine at once and gives it `stop_grace` seconds to clean up, then records
  INTERRUPTED. Output is refused once a stop is recorded, so an agent emitting before the stop
  reached this runner learns of it that way.

What a step writes while it runs (output, token deltas, agent events, tool calls) goes through its
StepEvents (step_events.py). Whatever way the step ends, the loop closes them before its next
write: buffered deltas are written and every tool call still open gets its one ending (cancelled
by the stop, or failed), so all of it lands before the boundary, the failure or the halt.

A pause cuts the step the same way; only the last write differs: `pause_halt` leaves the
operation PAUSED instead of INTERRUPTED, keeping the last checkpoint (a resume reruns the cut step
as a new attempt).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from opentelemetry import trace

from runtime_service import metrics, run_telemetry
from runtime_service.agents.base import Agent, StepContext, StepFailed, StepResult
from runtime_service.domain import Event, EventKind, JSONValue, Operation
from runtime_service.runner import runs
from runtime_service.runner.asking import Asking
from runtime_service.runner.limits import Limits, budget_cause, budget_spent
from runtime_service.runner.runs import Run, RunnerSettings
from runtime_service.runner.writes import Writes
from runtime_service.step_events import StepEvents
from runtime_service.storage import STORAGE_FAILURES, KeptState, Storage
from runtime_service.tools.toolbox import ToolBox
from stopline import logs, tracing
from stopline.json_values import json_problem, storable_text

log = logging.getLogger(__package__)


class Steps:
    def __init__(
        self,
        storage: Storage,
        settings: RunnerSettings,
        tools: ToolBox,
        meters: metrics.RuntimeMetrics,
        writes: Writes,
        limits: Limits,
        asking: Asking,
    ) -> None:
        self._storage = storage
        self.settings = settings
        self.runner_id = settings.runner_id
        self._tools = tools
        self.metrics = meters
        self._writes = writes
        self._write = writes.write
        self._limits = limits
        self._asking = asking
        # Steps that ignored their cancellation, held until they end.
        self._abandoned: set[asyncio.Task[Any]] = set()

    async def loop(
        self, run: Run, agent: Agent, operation: Operation, started: Event | None = None
    ) -> None:
        """Run the operation's steps from its last checkpoint; `started`: the first of them was
        begun already (claimed together)."""
        op_id = operation.id
        me = self.runner_id
        step = operation.steps_completed
        state = operation.agent_state
        storage = self._storage
        if started is None:
            if not run.stop.done() and budget_spent(operation, step):
                await self._limits.stop_self(run, budget_cause(operation))
            if run.stop.done():
                await self.halt(run, step, mid_step=False)
                return
            # The first step of a run is begun on its own; every later one is begun in the same
            # transaction that checkpoints the step before it (one write per step boundary).
            started = await self._write(op_id, storage.start_step(op_id, step, me))
        while True:
            if started is None:
                # A stop was recorded (or the operation ended or moved) before this step began.
                await self.halt(run, step, mid_step=False)
                return
            if run.stop.done():
                # Stopped after the step was recorded as begun, before the agent ran it.
                await self.halt(run, step, mid_step=True)
                return

            events = self._step_events(run, step)
            unknown = await self._unknown_calls(op_id, step, started)
            answer = await self._asking.answer(operation, step)
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
        run: Run,
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
        step_began = time.monotonic()
        await _first_done(step_task, run.stop if self.settings.abort_mid_step else None)
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
            await self.halt(run, step, mid_step=True, kept=kept)
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
            if not await self._asking.ask(op_id, step, result, result.ask):
                await self.halt(run, step + 1, mid_step=False)
            return None
        step_span.set_attribute(run_telemetry.STEP_OUTCOME, "done" if result.done else "returned")
        if result.done:
            written = await self._write(
                op_id, storage.complete(op_id, step, result.output, result.state, me)
            )
            if written and not written[-1].is_terminal:
                # The last step finished but a stop was recorded first: the stop wins.
                await self.halt(run, step + 1, mid_step=False)
            return None
        if budget_spent(operation, step + 1):
            # The budget is spent and the operation is not done: the stop is recorded before
            # the boundary write, which then checkpoints this step and begins no other.
            await self._limits.stop_self(run, budget_cause(operation))
        written = await self._write(
            op_id, storage.advance(op_id, step, result.output, result.state, me)
        )
        if not written:
            return None  # no longer ours: whoever owns it now carries on
        return result.state, written[1] if len(written) > 1 else None

    @staticmethod
    def _kept(op_id: str, ctx: StepContext) -> KeptState | None:
        """The state the cut step kept for a stop, if any and if JSON can store it."""
        if ctx.kept is None:
            return None
        problem = json_problem(ctx.kept.state)
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
            return storable_text(exc.message)
        if exc is not None:
            return storable_text(f"{type(exc).__name__}: {exc}")
        result: object = step_task.result()
        if not isinstance(result, StepResult):
            return f"step returned {type(result).__name__}, expected StepResult"
        for what, value in (("state", result.state), ("output", result.output)):
            problem = json_problem(value)
            if problem is not None:
                return f"step returned a {what} that is not JSON-serialisable: {problem}"
        return None

    async def _cancel_step(self, op_id: str, step_task: asyncio.Task[StepResult]) -> None:
        if not step_task.cancelling():  # else cancelled already, by the stop (runs.stop)
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

    async def halt(
        self, run: Run, step: int, *, mid_step: bool, kept: KeptState | None = None
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

    def _step_events(self, run: Run, step: int) -> StepEvents:
        """The StepContext's events for `step`: see step_events for deltas and tool calls."""
        return StepEvents(
            operation_id=run.operation_id,
            step=step,
            runner_id=self.runner_id,
            storage=self._storage,
            write_soon=partial(self._writes.write_soon, run.operation_id),
            stopped=run.stop.done,
            on_stop=partial(runs.stop, run, None),
            deltas=self.settings.deltas,
            tools=self._tools,
            abort_mid_step=self.settings.abort_mid_step,
            on_flush=self.metrics.deltas_per_event.observe,
        )


async def _first_done(step: asyncio.Future[Any], stop: asyncio.Future[Any] | None) -> None:
    """Wait until the step or the stop is done, as `asyncio.wait(..., FIRST_COMPLETED)` does
    but without its set, counter and closures per call: that wait was 4 % of the runtime's
    samples at capacity (a sixth of the step loop's own). Neither future is cancelled when the
    wait is."""
    if step.done() or (stop is not None and stop.done()):
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    step.add_done_callback(wake)
    if stop is not None:
        stop.add_done_callback(wake)
    try:
        await waiter
    finally:
        step.remove_done_callback(wake)
        if stop is not None:
            stop.remove_done_callback(wake)


def _returned(step_task: asyncio.Task[StepResult]) -> bool:
    """The step ran to its end and returned (rather than raised or was cancelled)."""
    return step_task.done() and not step_task.cancelled() and step_task.exception() is None
