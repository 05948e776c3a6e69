"""Storage of pausing: the pause intent, the pause landing, and the resume.

Like the rest of waiting for a person (waiting.py), these writes are rare, exist once for both
dialects, and lock the operation row first, each state change still a compare-and-set.

- `pause` records the pause intent of a RUNNING operation (its runner cuts the step, then
  `pause_halt`), or pauses a PENDING / WAITING one at once; `resume` makes it claimable again,
  or waiting again when its input request is still open.
- A pause requested while the operation's runner was dead lands when the claim finds it
  (`_pause_orphan`, called from claims.py).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select

from runtime_service.domain import (
    Event,
    EventKind,
    JSONValue,
    OperationStatus,
    PauseOutcome,
    PauseResult,
    ResumeOutcome,
    ResumeResult,
)
from runtime_service.notifications import STOPS, WORK, notify, pause_payload
from runtime_service.schema import operations
from runtime_service.storage.records import utcnow
from runtime_service.storage.waiting import OPEN, WaitingStorage, owned_by


class PausingStorage(WaitingStorage):
    """WaitingStorage plus pause and resume (see the module docstring)."""

    # ------------------------------------------------------------------ the runner's writes

    async def pause_halt(
        self, operation_id: str, step: int, mid_step: bool, runner_id: str
    ) -> Event | None:
        """RUNNING -> PAUSED after this runner cut the step for a pause; None when a stop was
        recorded meanwhile (it wins: the runner halts instead) or the operation is not ours.
        The kept state is not stored: a resume reruns the step from its last checkpoint."""
        return await self._call(self._pause_halt, operation_id, step, mid_step, runner_id)

    def _pause_halt(
        self, operation_id: str, step: int, mid_step: bool, runner_id: str
    ) -> Event | None:
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(
                select(
                    operations.c.stop_requested_at,
                    operations.c.pause_requested_at,
                    operations.c.pause_requested_by,
                )
                .where(owned_by(operation_id, runner_id))
                .with_for_update()
            ).first()
            if row is None or row.stop_requested_at is not None or row.pause_requested_at is None:
                return None
            if mid_step:
                self._settle_attempt(conn, operation_id, step, now, "paused", None)
            return self._paused(conn, operation_id, step, mid_step, row, now)

    def _pause_orphan(self, conn: Connection, operation_id: str, now: datetime) -> list[Event]:
        """A pause requested while the operation's runner was dead: pause it here (its open
        tool calls settled, its unfinished attempt abandoned), never resume it."""
        row = conn.execute(
            select(
                operations.c.steps_completed,
                operations.c.pause_requested_at,
                operations.c.pause_requested_by,
            ).where(operations.c.id == operation_id)
        ).one()
        lapsed = operations.c.status == OperationStatus.RUNNING
        settled = self._settle_open_calls(conn, operation_id, now, lapsed)
        self._settle_abandoned(conn, operation_id, now)
        return [*settled, self._paused(conn, operation_id, row.steps_completed, True, row, now)]

    # ------------------------------------------------------------------ pause and resume

    async def pause(
        self, operation_id: str, requested_by: str, runner_here: bool = False
    ) -> PauseResult | None:
        """None: unknown operation."""
        return await self._call(self._pause, operation_id, requested_by, runner_here)

    def _pause(
        self, operation_id: str, requested_by: str, runner_here: bool = False
    ) -> PauseResult | None:
        now = utcnow()
        with self.engine.begin() as conn:
            operation = self._lock(conn, operation_id)
            if operation is None:
                return None
            status = operation.status
            if status.is_terminal:
                return PauseResult(PauseOutcome.ALREADY_FINISHED, operation)
            if operation.stop is not None:
                return PauseResult(PauseOutcome.STOPPING, operation)
            if status is OperationStatus.PAUSED or operation.pause_requested_at is not None:
                return PauseResult(PauseOutcome.ALREADY_PAUSED, operation)
            event: Event | None
            if status is OperationStatus.RUNNING:
                # Its runner cuts the step (told at once, or by its lease loop's look at this
                # column), then lands the pause with pause_halt.
                event = self._append(
                    conn,
                    operation_id,
                    EventKind.PAUSE_REQUESTED,
                    {"requested_by": requested_by},
                    now,
                    where=operations.c.status == status,
                    values={"pause_requested_at": now, "pause_requested_by": requested_by},
                )
                if not runner_here:  # else told in-process (Storage.pause)
                    notify(conn, STOPS, pause_payload(operation_id))
            else:  # PENDING or WAITING: nothing runs, so it is paused now
                data: dict[str, JSONValue] = {
                    "mid_step": False,
                    "step": operation.steps_completed,
                    "requested_by": requested_by,
                }
                event = self._append(
                    conn,
                    operation_id,
                    EventKind.PAUSED,
                    data,
                    now,
                    where=operations.c.status == status,
                    values={"status": OperationStatus.PAUSED},
                )
            assert event is not None  # the row is locked
            return PauseResult(PauseOutcome.ACCEPTED, self._operation(conn, operation_id), (event,))

    async def resume(self, operation_id: str, requested_by: str) -> ResumeResult | None:
        """None: unknown operation."""
        return await self._call(self._resume, operation_id, requested_by)

    def _resume(self, operation_id: str, requested_by: str) -> ResumeResult | None:
        now = utcnow()
        with self.engine.begin() as conn:
            operation = self._lock(conn, operation_id)
            if operation is None:
                return None
            if operation.status.is_terminal:
                return ResumeResult(ResumeOutcome.ALREADY_FINISHED, operation)
            if operation.status is not OperationStatus.PAUSED:
                return ResumeResult(ResumeOutcome.NOT_PAUSED, operation)
            waiting = False
            if operation.input_request_id is not None:
                stored = self._read_request(conn, operation_id, operation.input_request_id)
                waiting = stored is not None and stored.outcome == OPEN
            status = OperationStatus.WAITING if waiting else OperationStatus.PENDING
            event = self._append(
                conn,
                operation_id,
                EventKind.RESUMED,
                {"requested_by": requested_by, "status": status.value},
                now,
                where=operations.c.status == OperationStatus.PAUSED,
                values={"status": status},
            )
            assert event is not None
            if status is OperationStatus.PENDING:
                notify(conn, WORK)
            return ResumeResult(
                ResumeOutcome.ACCEPTED, self._operation(conn, operation_id), (event,)
            )
