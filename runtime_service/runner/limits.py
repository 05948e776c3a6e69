"""An operation's limits, enforced by the runtime as stops of its own: the deadline (a timer armed
by whichever runner owns the operation; the sweep for operations that wait with nobody owning
them) and the step budget (checked at each step boundary). Either is recorded through the same
write as a user's stop, with its own cause."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from runtime_service import stop_causes
from runtime_service.domain import InterruptOutcome, Operation
from runtime_service.runner import runs
from runtime_service.runner.runs import Run
from runtime_service.runner.writes import Writes
from runtime_service.storage import STORAGE_FAILURES, Storage

log = logging.getLogger(__package__)


def budget_spent(operation: Operation, steps_completed: int) -> bool:
    """No further step may begin once this many steps completed."""
    return operation.max_steps is not None and steps_completed >= operation.max_steps


def budget_cause(operation: Operation) -> stop_causes.RuntimeStop:
    """The stop of an operation whose step budget is spent."""
    assert operation.max_steps is not None
    return stop_causes.step_budget_exhausted(operation.max_steps)


def _deadline_cause(operation: Operation, deadline_at: datetime) -> stop_causes.RuntimeStop:
    return stop_causes.deadline_exceeded((deadline_at - operation.created_at).total_seconds())


class Limits:
    def __init__(self, storage: Storage, writes: Writes, poll_seconds: float) -> None:
        self._storage = storage
        self._writes = writes
        self._poll_seconds = poll_seconds

    def arm_deadline(self, run: Run, operation: Operation) -> None:
        """Stop the operation at its stored deadline; armed by whichever runner owns it (at
        claim, or at takeover from the same column), at once when the deadline is past."""
        if operation.deadline_at is None or operation.status.is_terminal:
            return
        cause = _deadline_cause(operation, operation.deadline_at)
        timer = self._deadline_timer(run, operation.deadline_at, cause)
        run.deadline = asyncio.create_task(timer, name=f"operation {run.operation_id} deadline")

    async def _deadline_timer(
        self, run: Run, deadline_at: datetime, cause: stop_causes.RuntimeStop
    ) -> None:
        await asyncio.sleep(max(0.0, (deadline_at - datetime.now(UTC)).total_seconds()))
        while not run.stop.done():
            try:
                await self.stop_self(run, cause)
            except STORAGE_FAILURES as exc:
                log.warning(
                    "operation %s: recording its deadline stop failed (%s)", run.operation_id, exc
                )
                await asyncio.sleep(self._poll_seconds)
            else:
                return

    async def stop_self(self, run: Run, cause: stop_causes.RuntimeStop) -> None:
        """Record a stop the runtime requests (a limit was reached) through the same write as
        a user's stop, and deliver it to this run at once."""
        op_id = run.operation_id
        with self._writes.hub.local_write(op_id):
            result = await self._storage.record_stop(
                op_id, cause.requested_by, cause.reason, cause.cause, runner_here=True
            )
            committed = datetime.now(UTC)
            if result is None:
                return
            self._writes.publish(list(result.events))
        if not result.operation.status.is_terminal:
            ours = result.outcome is InterruptOutcome.ACCEPTED  # else a stop came first
            runs.stop(
                run, committed if ours else None, stop_causes.label(cause.cause) if ours else None
            )

    async def stop_overdue_waiting(self) -> None:
        """Stop the waiting operations past their deadline. Nobody owns one to arm its deadline:
        the stop is recorded here, and ends it at once (no step is in flight)."""
        for operation in await self._storage.overdue_waiting():
            assert operation.deadline_at is not None
            cause = _deadline_cause(operation, operation.deadline_at)
            stopped = await self._storage.record_stop(
                operation.id, cause.requested_by, cause.reason, cause.cause
            )
            if stopped is not None:
                self._writes.publish(list(stopped.events))
