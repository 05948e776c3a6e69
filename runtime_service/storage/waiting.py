"""Storage of waiting for a person: input requests, answers and expiry (pause and resume build on
these in pausing.py).

These writes are rare next to the step writes (once per question, answer or pause, not per
step), so, like the claim of abandoned work, they exist once for both dialects, as SQLAlchemy
Core in one transaction each. Every one locks the operation row first (FOR UPDATE; SQLite's
BEGIN IMMEDIATE takes the whole database), so two racing answers, an answer and an expiry, or a
pause and the runner's own write are serialised on that row, and each state change is still a
compare-and-set (`_append`'s WHERE), so the same guarantees hold without the lock.

- `ask` is the runner's write that ends a step with a question: checkpoint the step, store the
  request, RUNNING -> WAITING, drop the runner and its lease (the operation holds no slot).
- `answer` resolves an open request once: the request row's `outcome` goes 'open' ->
  'answered' by a compare-and-set, and only the call that made it do so reports `won`; the
  operation goes WAITING -> PENDING (claimable on any replica; `stopline_work` tells them).
- `expire_requests` resolves open requests past their expiry with their default, the same way;
  every replica's lease loop sweeps, so an expiry survives the death of any of them.
- `pause` and `resume`: see pausing.py; a pause that was requested while a step asked its
  question lands here, with the question (`_paused`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from runtime_service.domain import (
    AnswerResult,
    Event,
    EventKind,
    JSONValue,
    Operation,
    OperationStatus,
    StoredRequest,
)
from runtime_service.notifications import WORK, notify
from runtime_service.rows import load_json, operation_from_row
from runtime_service.schema import input_requests, operations, steps
from runtime_service.storage.interface import NewRequest
from runtime_service.storage.records import utcnow
from runtime_service.storage.shared import SharedStorage
from stopline.json_values import dump_json

OPEN, ANSWERED, EXPIRED = "open", "answered", "expired"
EXPIRED_BY = "runtime"
_WAITS = (OperationStatus.WAITING, OperationStatus.PAUSED)


def owned_by(operation_id: str, runner_id: str) -> ColumnElement[bool]:
    return (
        (operations.c.id == operation_id)
        & (operations.c.status == OperationStatus.RUNNING)
        & (operations.c.runner_id == runner_id)
    )


def _request_from_row(row: Any) -> StoredRequest:
    return StoredRequest(
        operation_id=row.operation_id,
        request_id=row.request_id,
        step=row.step,
        kind=row.kind,
        data=json.loads(row.request_json),
        schema=load_json(row.schema_json),
        default=json.loads(row.default_json),
        expires_at=row.expires_at,
        outcome=row.outcome,
        answer_id=row.answer_id,
        answer=load_json(row.answer_json),
        answered_by=row.answered_by,
        resolved_at=row.resolved_at,
    )


class WaitingStorage(SharedStorage):
    """SharedStorage plus the writes of waiting for a person (see the module docstring)."""

    # ------------------------------------------------------------------ the runner's writes

    async def ask(
        self,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        request: NewRequest,
        runner_id: str,
    ) -> list[Event]:
        return await self._call(self._ask, operation_id, step, output, state, request, runner_id)

    def _ask(
        self,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        request: NewRequest,
        runner_id: str,
    ) -> list[Event]:
        now = utcnow()
        owned = owned_by(operation_id, runner_id)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(
                    operations.c.stop_requested_at,
                    operations.c.pause_requested_at,
                    operations.c.pause_requested_by,
                )
                .where(owned)
                .with_for_update()
            ).first()
            if row is None:
                return []
            output_json = dump_json(output)
            self._settle_attempt(conn, operation_id, step, now, "completed", output_json)
            completed = self._append(
                conn,
                operation_id,
                EventKind.STEP_COMPLETED,
                {"step": step, "output": output},
                now,
                where=owned,
                values={"steps_completed": step + 1, "agent_state_json": dump_json(state)},
            )
            assert completed is not None  # the row is locked and ours
            if row.stop_requested_at is not None:
                return [completed]  # the stop wins at this boundary: the runner halts
            conn.execute(
                insert(input_requests).values(
                    operation_id=operation_id,
                    request_id=request.request_id,
                    step=step,
                    kind=request.kind,
                    prompt=request.prompt,
                    request_json=dump_json(request.data),
                    schema_json=None if request.schema is None else dump_json(request.schema),
                    default_json=dump_json(request.default),
                    expires_at=request.expires_at,
                    created_at=now,
                    outcome=OPEN,
                )
            )
            asked = self._append(
                conn,
                operation_id,
                EventKind.INPUT_REQUESTED,
                request.data,
                now,
                where=owned,
                values={
                    "status": OperationStatus.WAITING,
                    "runner_id": None,
                    "lease_expires_at": None,
                    "input_request_id": request.request_id,
                },
            )
            assert asked is not None
            written = [completed, asked]
            if row.pause_requested_at is not None:
                # Paused while the step ran: it stays paused, waiting or not (see resume).
                written.append(self._paused(conn, operation_id, step + 1, False, row, now))
            return written

    def _paused(
        self,
        conn: Connection,
        operation_id: str,
        step: int,
        mid_step: bool,
        row: Any,
        now: datetime,
    ) -> Event:
        """The pause lands: status PAUSED, no runner, the intent consumed."""
        data: dict[str, JSONValue] = {
            "mid_step": mid_step,
            "step": step,
            "requested_by": row.pause_requested_by or "",
        }
        event = self._append(
            conn,
            operation_id,
            EventKind.PAUSED,
            data,
            now,
            where=operations.c.stop_requested_at.is_(None),
            values={
                "status": OperationStatus.PAUSED,
                "runner_id": None,
                "lease_expires_at": None,
                "pause_requested_at": None,
                "pause_requested_by": None,
            },
        )
        assert event is not None  # the row is locked, and no stop is recorded
        return event

    @staticmethod
    def _settle_attempt(
        conn: Connection,
        operation_id: str,
        step: int,
        now: datetime,
        outcome: str,
        output_json: str | None,
    ) -> None:
        newest = (
            select(func.max(steps.c.attempt))
            .where(steps.c.operation_id == operation_id, steps.c.step == step)
            .scalar_subquery()
        )
        conn.execute(
            update(steps)
            .where(
                steps.c.operation_id == operation_id,
                steps.c.step == step,
                steps.c.finished_at.is_(None),
                steps.c.attempt == newest,
            )
            .values(finished_at=now, outcome=outcome, output_json=output_json)
        )

    # ------------------------------------------------------------------ answers and expiry

    async def input_request(self, operation_id: str, request_id: str) -> StoredRequest | None:
        return await self._call(self._input_request, operation_id, request_id)

    def _input_request(self, operation_id: str, request_id: str) -> StoredRequest | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(input_requests).where(
                    input_requests.c.operation_id == operation_id,
                    input_requests.c.request_id == request_id,
                )
            ).first()
        return None if row is None else _request_from_row(row)

    async def answer(
        self,
        operation_id: str,
        request_id: str,
        answer_id: str,
        answer: dict[str, JSONValue],
        answered_by: str,
    ) -> AnswerResult | None:
        """Resolve an open request with this answer, once. None: no such request. Otherwise
        the request as it stands after the call (answered by this call when `won`; answered
        earlier, possibly by the same answer id; expired, now or before), and the operation."""
        return await self._call(
            self._answer, operation_id, request_id, answer_id, answer, answered_by
        )

    def _answer(
        self,
        operation_id: str,
        request_id: str,
        answer_id: str,
        answer: dict[str, JSONValue],
        answered_by: str,
    ) -> AnswerResult | None:
        now = utcnow()
        with self.engine.begin() as conn:
            operation = self._lock(conn, operation_id)
            if operation is None:
                return None
            stored = self._read_request(conn, operation_id, request_id)
            if stored is None:
                return None
            if stored.outcome != OPEN or operation.status.is_terminal:
                return AnswerResult(stored, operation, won=False)
            if stored.expires_at <= now:
                # Expired but not swept yet: the default wins, as the sweep would have it.
                events = self._resolve(conn, stored, EXPIRED, "", stored.default, EXPIRED_BY, now)
                won = False
            else:
                events = self._resolve(conn, stored, ANSWERED, answer_id, answer, answered_by, now)
                won = bool(events)
            after = self._read_request(conn, operation_id, request_id)
            assert after is not None
            return AnswerResult(after, self._operation(conn, operation_id), won, tuple(events))

    async def expire_requests(self, limit: int = 100) -> list[Event]:
        """Resolve up to `limit` open requests past their expiry with their defaults (any
        replica may: each is a compare-and-set). The events written, to publish."""
        return await self._call(self._expire_requests, limit)

    def _expire_requests(self, limit: int) -> list[Event]:
        now = utcnow()
        due = (
            select(input_requests.c.operation_id, input_requests.c.request_id)
            .where(input_requests.c.outcome == OPEN, input_requests.c.expires_at <= now)
            .order_by(input_requests.c.expires_at, input_requests.c.operation_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            found = conn.execute(due).all()
        written: list[Event] = []
        for operation_id, request_id in found:
            # One transaction each, the operation row locked first as an answer locks it.
            with self.engine.begin() as conn:
                if self._lock(conn, operation_id) is None:
                    continue
                stored = self._read_request(conn, operation_id, request_id)
                if stored is None or stored.outcome != OPEN:
                    continue  # answered or swept meanwhile
                written.extend(
                    self._resolve(conn, stored, EXPIRED, "", stored.default, EXPIRED_BY, now)
                )
        return written

    def _resolve(
        self,
        conn: Connection,
        stored: StoredRequest,
        outcome: str,
        answer_id: str,
        answer: dict[str, JSONValue],
        answered_by: str,
        now: datetime,
    ) -> list[Event]:
        """Open -> `outcome` (the compare-and-set), and the operation WAITING -> PENDING with
        its input_answered event (a PAUSED one stays paused; an ended one gets no event)."""
        resolved = conn.execute(
            update(input_requests)
            .where(
                input_requests.c.operation_id == stored.operation_id,
                input_requests.c.request_id == stored.request_id,
                input_requests.c.outcome == OPEN,
            )
            .values(
                outcome=outcome,
                answer_id=answer_id or None,
                answer_json=dump_json(answer),
                answered_by=answered_by,
                resolved_at=now,
            )
        ).rowcount
        if not resolved:
            return []
        data: dict[str, JSONValue] = {
            "step": stored.step,
            "request_id": stored.request_id,
            "answer_id": answer_id,
            "answer": answer,
            "answered_by": answered_by,
            "expired": outcome == EXPIRED,
        }
        event = self._append(
            conn,
            stored.operation_id,
            EventKind.INPUT_ANSWERED,
            data,
            now,
            where=operations.c.status.in_(_WAITS),
            values={
                "status": case(
                    (operations.c.status == OperationStatus.WAITING, OperationStatus.PENDING),
                    else_=operations.c.status,
                )
            },
        )
        if event is None:
            return []
        notify(conn, WORK)
        return [event]

    async def overdue_waiting(self, limit: int = 100) -> list[Operation]:
        """WAITING or PAUSED operations past their deadline with no stop recorded: no runner
        owns them to arm the deadline, so the lease loop's sweep stops them."""
        return await self._call(self._overdue_waiting, limit)

    def _overdue_waiting(self, limit: int) -> list[Operation]:
        query = (
            select(operations)
            .where(
                operations.c.status.in_(_WAITS),
                operations.c.deadline_at <= utcnow(),
                operations.c.stop_requested_at.is_(None),
            )
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [operation_from_row(row) for row in conn.execute(query)]

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _lock(conn: Connection, operation_id: str) -> Operation | None:
        row = conn.execute(
            select(operations).where(operations.c.id == operation_id).with_for_update()
        ).first()
        return None if row is None else operation_from_row(row)

    @staticmethod
    def _operation(conn: Connection, operation_id: str) -> Operation:
        row = conn.execute(select(operations).where(operations.c.id == operation_id)).one()
        return operation_from_row(row)

    @staticmethod
    def _read_request(conn: Connection, operation_id: str, request_id: str) -> StoredRequest | None:
        row = conn.execute(
            select(input_requests).where(
                input_requests.c.operation_id == operation_id,
                input_requests.c.request_id == request_id,
            )
        ).first()
        return None if row is None else _request_from_row(row)
