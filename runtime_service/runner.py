"""The step loop: runs each operation's steps, checkpoints them, and halts on a stop.

A stop reaches a running operation two ways, and either is enough on its own:
- at every step boundary: `start_step` is a conditional write that refuses to begin a step once a
  stop is recorded, and `complete_step` refuses to complete an operation whose stop came first;
- mid-step: `deliver_stop` resolves the run's stop future, the loop cancels the agent's step
  coroutine at once and gives it `stop_grace` seconds to clean up, then records INTERRUPTED.

Cancelling the runner task itself (runtime shutdown) is not a stop: nothing terminal is written,
the operation stays RUNNING, and the next runtime resumes it from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from runtime_service.agents.base import Agent, StepContext, StepResult
from runtime_service.agents.registry import AgentRegistry
from runtime_service.database import Database
from runtime_service.domain import Event, JSONValue, Operation
from runtime_service.hub import EventHub
from runtime_service.store import OperationStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class OperationHalted(Exception):
    """Raised inside an agent that emits output after its operation has ended."""


@dataclass(eq=False)
class _Run:
    operation_id: str
    stop: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    claimed: bool = False
    step_task: asyncio.Task[StepResult] | None = field(default=None, repr=False)


def _json_error(value: JSONValue) -> str | None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)
    return None


class Runner:
    def __init__(
        self,
        db: Database,
        store: OperationStore,
        agents: AgentRegistry,
        hub: EventHub,
        runner_id: str,
        stop_grace: float,
        max_running: int,
    ) -> None:
        self._db = db
        self._store = store
        self._agents = agents
        self._hub = hub
        self.runner_id = runner_id
        self._stop_grace = stop_grace
        self._runs: dict[str, _Run] = {}
        # Operations beyond capacity stay PENDING (and stoppable) until a slot frees up.
        self._slots = asyncio.Semaphore(max_running)
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._held: dict[str, asyncio.TimerHandle] = {}

    # ------------------------------------------------------------------ public

    def hold(self, operation_id: str, seconds: float) -> None:
        """Run the operation only after `seconds`, unless released (or stopped) before that."""
        loop = asyncio.get_running_loop()
        self._held[operation_id] = loop.call_later(seconds, self.release, operation_id)

    def release(self, operation_id: str) -> None:
        """End a hold early (no-op for an operation that is not held)."""
        handle = self._held.pop(operation_id, None)
        if handle is not None:
            handle.cancel()
            self.submit(operation_id)

    def submit(self, operation_id: str) -> None:
        """Run the operation in the background (no-op if this runner already runs it)."""
        if operation_id in self._runs:
            return
        run = _Run(operation_id, asyncio.get_running_loop().create_future())
        self._runs[operation_id] = run
        run.task = asyncio.create_task(self._run(run), name=f"operation {operation_id}")
        run.task.add_done_callback(partial(self._forget, run))

    def deliver_stop(self, operation_id: str) -> bool:
        """Wake the loop of an operation this runner is running; False if it runs nothing by
        that id (the stop is still recorded in storage, where the boundary check finds it)."""
        held = self._held.pop(operation_id, None)
        if held is not None:
            held.cancel()  # its stop already ended it in storage; nothing left to run
        run = self._runs.get(operation_id)
        if run is None:
            return False
        if not run.claimed and run.task is not None:
            # Still waiting for a slot: its stop already ended it in storage, drop the wait.
            run.task.cancel()
        if not run.stop.done():
            run.stop.set_result(None)
        return True

    def is_running(self, operation_id: str) -> bool:
        return operation_id in self._runs

    @property
    def running_count(self) -> int:
        """Operations holding a slot (claimed or being claimed), not those waiting for one."""
        return sum(1 for run in self._runs.values() if run.claimed)

    async def resume_unfinished(self) -> list[str]:
        """At start-up: pick up PENDING operations and RUNNING ones left by a dead process."""
        ids: list[str] = await self._db.call(self._store.unfinished_ids)
        for operation_id in ids:
            self.submit(operation_id)
        return ids

    async def wait_finished(self, operation_id: str) -> None:
        """Until this runner no longer runs the operation (for tests and shutdown)."""
        run = self._runs.get(operation_id)
        if run is not None and run.task is not None:
            await asyncio.wait({run.task})

    async def shutdown(self) -> None:
        """Cancel every run without recording anything: the operations stay RUNNING and are
        resumed from their checkpoints by the next runtime."""
        for handle in self._held.values():
            handle.cancel()  # held operations stay PENDING; the next start-up runs them
        self._held.clear()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # ------------------------------------------------------------------ the loop

    def _forget(self, run: _Run, task: asyncio.Task[None]) -> None:
        self._runs.pop(run.operation_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("operation %s: runner crashed", run.operation_id, exc_info=task.exception())

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._db.call(fn, *args)

    def _publish(self, events: Sequence[Event] | Event | None) -> None:
        if events is None:
            return
        self._hub.publish([events] if isinstance(events, Event) else events)

    async def _run(self, run: _Run) -> None:
        async with self._slots:
            await self._claim_and_run(run)

    async def _claim_and_run(self, run: _Run) -> None:
        op_id = run.operation_id
        # Set before the write: from here on a stop must reach the loop, not cancel the task
        # (cancelling mid-claim could leave the operation RUNNING with nobody running it).
        run.claimed = True
        claimed = await self._write(self._store.claim, op_id, self.runner_id)
        if claimed is None:
            return  # finished, or interrupted before it started
        self._publish(claimed.event)
        operation = claimed.operation
        agent = self._agents.get(operation.agent)
        if agent is None:
            message = f"agent {operation.agent!r} is not registered with this runtime"
            self._publish(
                await self._write(
                    self._store.finish_failed, op_id, operation.steps_completed, message
                )
            )
            return
        try:
            await self._loop(run, agent, operation)
        finally:
            if run.step_task is not None and not run.step_task.done():
                run.step_task.cancel()  # shutdown: do not leave the agent running

    async def _loop(self, run: _Run, agent: Agent, operation: Operation) -> None:
        op_id = operation.id
        step = operation.steps_completed
        state = operation.agent_state
        while True:
            if run.stop.done():
                await self._halt(op_id, step, mid_step=False)
                return
            started = await self._write(self._store.start_step, op_id, step, self.runner_id)
            if started is None:
                # A stop was recorded (or the operation ended) before this step could begin.
                await self._halt(op_id, step, mid_step=False)
                return
            self._publish(started)

            ctx = StepContext(op_id, step, operation.input, state, partial(self._emit, op_id, step))
            step_task = asyncio.create_task(agent.step(ctx), name=f"operation {op_id} step {step}")
            run.step_task = step_task
            either: set[asyncio.Future[Any]] = {step_task, run.stop}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if run.stop.done() and not step_task.done():
                await self._cancel_step(op_id, step_task)
                await self._halt(op_id, step, mid_step=True)
                return
            run.step_task = None

            if step_task.cancelled():
                failure: str | None = "the step was cancelled by the agent itself"
            elif (exc := step_task.exception()) is not None:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                result = step_task.result()
                failure = self._invalid_result(result)
            if failure is not None:
                self._publish(await self._write(self._store.finish_failed, op_id, step, failure))
                return

            written = await self._write(
                self._store.complete_step, op_id, step, result.output, result.state, result.done
            )
            self._publish(written)
            if not written or written[-1].is_terminal:
                return
            step += 1
            state = result.state
            if result.done:
                # The last step finished but a stop was recorded first: the stop wins.
                await self._halt(op_id, step, mid_step=False)
                return

    @staticmethod
    def _invalid_result(result: object) -> str | None:
        if not isinstance(result, StepResult):
            return f"step returned {type(result).__name__}, expected StepResult"
        for what, value in (("state", result.state), ("output", result.output)):
            problem = _json_error(value)
            if problem is not None:
                return f"step returned a {what} that is not JSON-serialisable: {problem}"
        return None

    async def _cancel_step(self, op_id: str, step_task: asyncio.Task[StepResult]) -> None:
        step_task.cancel()
        done, _ = await asyncio.wait({step_task}, timeout=self._stop_grace)
        if not done:
            log.warning(
                "operation %s: the agent ignored cancellation for %.1fs; abandoning its step",
                op_id,
                self._stop_grace,
            )
            self._abandoned.add(step_task)
            step_task.add_done_callback(self._abandoned.discard)
        elif not step_task.cancelled() and step_task.exception() is not None:
            log.info(
                "operation %s: step raised while being cancelled: %r", op_id, step_task.exception()
            )

    async def _halt(self, op_id: str, step: int, *, mid_step: bool) -> None:
        self._publish(await self._write(self._store.finish_interrupted, op_id, step, mid_step))

    async def _emit(self, op_id: str, step: int, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"emit() takes a str, got {type(text).__name__}")
        # The write goes on even if the agent is cancelled while awaiting it, and its event is
        # published when it lands, so the chunk is never stored yet unannounced.
        write = asyncio.ensure_future(self._db.call(self._store.append_chunk, op_id, step, text))
        write.add_done_callback(self._publish_write)
        event = await asyncio.shield(write)
        if event is None:
            raise OperationHalted(f"operation {op_id} has ended; its output is no longer stored")

    def _publish_write(self, write: asyncio.Future[Event | None]) -> None:
        if not write.cancelled() and write.exception() is None:
            self._publish(write.result())
