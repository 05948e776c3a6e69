"""All reads and writes of operations, events and steps, as short synchronous transactions.

Invariants kept here and nowhere else:
- Every state change is a conditional UPDATE of the operation row (compare-and-set): it names the
  statuses it may leave, so two racing writers (a stop and a completing step) cannot both win.
- The same UPDATE bumps `last_seq`, and the event it reports is inserted with that seq in the
  same transaction: the event sequence is gap-free and never disagrees with the stored state.
- Step writes never touch the stop-intent columns, and the stop write touches nothing but them
  (and the status, for an operation that never started), so neither can overwrite the other.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from runtime_service.domain import (
    ACTIVE_STATUSES,
    Event,
    EventKind,
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    OperationStatus,
    StopIntent,
)
from runtime_service.schema import events, operations, steps
from stopline.errors import AlreadyExists

STOPPING = "STOPPING"
"""List filter for RUNNING operations with a stop recorded (see Operation.is_stopping)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def dump_json(value: JSONValue) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_hash(agent: str, input_value: JSONValue, labels: Mapping[str, str]) -> str:
    """Fingerprint of a start request, to tell a retried idempotent start from a conflicting one."""
    # Without labels the fingerprint is the one stored before labels existed (migration 0002).
    parts: list[Any] = [agent, input_value, dict(labels)] if labels else [agent, input_value]
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Keyset position: the last (created_at, id) of the previous page, newest first."""

    created_at: datetime
    id: str


@dataclass(frozen=True, slots=True)
class Created:
    operation: Operation
    created: bool
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Claimed:
    """An operation a runner now owns, with the event announcing it."""

    operation: Operation
    event: Event


class OperationStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ----------------------------------------------------------------------------- reads

    def get(self, operation_id: str) -> Operation | None:
        with self.engine.begin() as conn:
            return self._get(conn, operation_id)

    def list_page(
        self, status: str | None, limit: int, after: ListCursor | None
    ) -> tuple[list[Operation], ListCursor | None]:
        """A page of operations newest first, and the cursor of the next page (None at the end)."""
        query = select(operations)
        if status == STOPPING:
            query = query.where(
                operations.c.status == OperationStatus.RUNNING,
                operations.c.stop_requested_at.is_not(None),
            )
        elif status == OperationStatus.RUNNING:
            query = query.where(
                operations.c.status == OperationStatus.RUNNING,
                operations.c.stop_requested_at.is_(None),
            )
        elif status is not None:
            query = query.where(operations.c.status == status)
        if after is not None:
            query = query.where(
                or_(
                    operations.c.created_at < after.created_at,
                    and_(operations.c.created_at == after.created_at, operations.c.id < after.id),
                )
            )
        query = query.order_by(operations.c.created_at.desc(), operations.c.id.desc())
        with self.engine.begin() as conn:
            rows = conn.execute(query.limit(limit + 1)).all()
        page = [_operation(r) for r in rows[:limit]]
        more = len(rows) > limit
        cursor = ListCursor(page[-1].created_at, page[-1].id) if more and page else None
        return page, cursor

    def events_after(self, operation_id: str, after_seq: int, limit: int = 1000) -> list[Event]:
        query = (
            select(events)
            .where(events.c.operation_id == operation_id, events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
        with self.engine.begin() as conn:
            return [_event(r) for r in conn.execute(query)]

    def step_records(self, operation_id: str) -> list[Row[Any]]:
        """Every attempt at every step of an operation, for audits and tests."""
        query = (
            select(steps)
            .where(steps.c.operation_id == operation_id)
            .order_by(steps.c.step, steps.c.attempt)
        )
        with self.engine.begin() as conn:
            return list(conn.execute(query).all())

    def unfinished_ids(self) -> list[str]:
        """Operations a runtime must pick up at start: PENDING ones and RUNNING ones whose
        runner is gone (with a single replica, every RUNNING one at start-up)."""
        query = (
            select(operations.c.id)
            .where(operations.c.status.in_(list(ACTIVE_STATUSES)))
            .order_by(operations.c.created_at, operations.c.id)
        )
        with self.engine.begin() as conn:
            return list(conn.execute(query).scalars())

    # ----------------------------------------------------------------------------- writes

    def create(
        self,
        agent: str,
        input_value: JSONValue,
        idempotency_key: str | None,
        labels: Mapping[str, str] | None = None,
    ) -> Created:
        """Insert a PENDING operation and its `created` event, or find the idempotent twin."""
        labels = dict(labels or {})
        fingerprint = request_hash(agent, input_value, labels)
        if idempotency_key is not None:
            existing = self._find_by_key(idempotency_key, fingerprint)
            if existing is not None:
                return Created(existing, created=False, events=())
        now = utcnow()
        op_id = str(uuid.uuid4())
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(operations).values(
                        id=op_id,
                        agent=agent,
                        input_json=dump_json(input_value),
                        request_hash=fingerprint,
                        idempotency_key=idempotency_key,
                        labels_json=dump_json(labels) if labels else None,
                        status=OperationStatus.PENDING,
                        steps_completed=0,
                        last_seq=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                event = self._append(conn, op_id, EventKind.CREATED, {"agent": agent}, now)
                assert event is not None
                operation = self._get(conn, op_id)
                assert operation is not None
        except IntegrityError:
            # Lost a race with a concurrent start using the same key: return the winner.
            if idempotency_key is None:
                raise
            existing = self._find_by_key(idempotency_key, fingerprint)
            if existing is None:
                raise
            return Created(existing, created=False, events=())
        return Created(operation, created=True, events=(event,))

    def record_stop(
        self, operation_id: str, requested_by: str, reason: str
    ) -> InterruptResult | None:
        """Store the stop intent once. A PENDING operation is interrupted right here, so no
        runner can ever start a step of it. Returns None for an unknown id."""
        now = utcnow()
        with self.engine.begin() as conn:
            stop_event = self._append(
                conn,
                operation_id,
                EventKind.STOP_REQUESTED,
                {"requested_by": requested_by, "reason": reason},
                now,
                where=and_(
                    operations.c.status.in_(list(ACTIVE_STATUSES)),
                    operations.c.stop_requested_at.is_(None),
                ),
                values={
                    "stop_requested_at": now,
                    "stop_requested_by": requested_by,
                    "stop_reason": reason,
                },
            )
            if stop_event is not None:
                recorded: list[Event] = [stop_event]
                halted = self._append(
                    conn,
                    operation_id,
                    EventKind.INTERRUPTED,
                    {"mid_step": False, "step": 0, "halt_ms": 0.0},
                    now,
                    where=operations.c.status == OperationStatus.PENDING,
                    values={"status": OperationStatus.INTERRUPTED, "finished_at": now},
                )
                if halted is not None:
                    recorded.append(halted)
                operation = self._get(conn, operation_id)
                assert operation is not None
                return InterruptResult(InterruptOutcome.ACCEPTED, operation, tuple(recorded))
            operation = self._get(conn, operation_id)
        if operation is None:
            return None
        if operation.stop is not None:
            return InterruptResult(InterruptOutcome.ALREADY_REQUESTED, operation)
        return InterruptResult(InterruptOutcome.ALREADY_FINISHED, operation)

    def claim(self, operation_id: str, runner_id: str) -> Claimed | None:
        """Take ownership: PENDING -> RUNNING, or re-own a RUNNING operation whose runner died.
        None when the operation is finished (or already interrupted before it started)."""
        now = utcnow()
        with self.engine.begin() as conn:
            before = self._get(conn, operation_id)
            if before is None or before.status.is_terminal:
                return None
            resumed = before.status is OperationStatus.RUNNING
            event = self._append(
                conn,
                operation_id,
                EventKind.STARTED,
                {"from_step": before.steps_completed, "resumed": resumed},
                now,
                where=operations.c.status == before.status,
                values={"status": OperationStatus.RUNNING, "runner_id": runner_id},
            )
            if event is None:
                return None
            operation = self._get(conn, operation_id)
            assert operation is not None
            return Claimed(operation, event)

    def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        """Record that a step begins (an attempt row and a `step_started` event); None when the
        operation is no longer RUNNING, so the runner must not start the step."""
        now = utcnow()
        with self.engine.begin() as conn:
            attempt = 1 + (
                conn.execute(
                    select(func.count())
                    .select_from(steps)
                    .where(steps.c.operation_id == operation_id, steps.c.step == step)
                ).scalar_one()
            )
            event = self._append(
                conn,
                operation_id,
                EventKind.STEP_STARTED,
                {"step": step, "attempt": attempt},
                now,
                where=and_(
                    operations.c.status == OperationStatus.RUNNING,
                    operations.c.stop_requested_at.is_(None),
                ),
            )
            if event is None:
                return None
            conn.execute(
                insert(steps).values(
                    operation_id=operation_id,
                    step=step,
                    attempt=attempt,
                    runner_id=runner_id,
                    started_at=now,
                )
            )
            return event

    def append_chunk(self, operation_id: str, step: int, text: str) -> Event | None:
        """Store an output chunk; None when the operation has already ended (a step that kept
        emitting after it was cancelled gets its output dropped, not appended after the end)."""
        with self.engine.begin() as conn:
            return self._append(
                conn,
                operation_id,
                EventKind.OUTPUT_CHUNK,
                {"step": step, "text": text},
                utcnow(),
                where=operations.c.status == OperationStatus.RUNNING,
            )

    def complete_step(
        self,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        done: bool,
    ) -> list[Event]:
        """Checkpoint a finished step and, if it was the last, complete the operation.

        Completion is refused when a stop was recorded first: the stop wins, and the runner then
        ends the operation INTERRUPTED at this boundary. Empty list: no longer RUNNING."""
        now = utcnow()
        output_json = dump_json(output)
        state_json = dump_json(state)
        with self.engine.begin() as conn:
            completed = self._append(
                conn,
                operation_id,
                EventKind.STEP_COMPLETED,
                {"step": step, "output": output},
                now,
                where=operations.c.status == OperationStatus.RUNNING,
                values={"steps_completed": step + 1, "agent_state_json": state_json},
            )
            if completed is None:
                return []
            self._finish_attempt(conn, operation_id, step, now, "completed", output_json)
            written = [completed]
            if done:
                final = self._append(
                    conn,
                    operation_id,
                    EventKind.COMPLETED,
                    {"result": output},
                    now,
                    where=and_(
                        operations.c.status == OperationStatus.RUNNING,
                        operations.c.stop_requested_at.is_(None),
                    ),
                    values={
                        "status": OperationStatus.COMPLETED,
                        "result_json": output_json,
                        "finished_at": now,
                    },
                )
                if final is not None:
                    written.append(final)
            return written

    def finish_interrupted(self, operation_id: str, step: int, mid_step: bool) -> Event | None:
        """RUNNING -> INTERRUPTED after the runner halted; halt_ms is measured from the stored
        stop time, so it covers delivery and cancellation, not just the final write."""
        now = utcnow()
        with self.engine.begin() as conn:
            requested_at = conn.execute(
                select(operations.c.stop_requested_at).where(operations.c.id == operation_id)
            ).scalar_one_or_none()
            halt_ms = 0.0
            if requested_at is not None:
                halt_ms = max(0.0, (now - requested_at).total_seconds() * 1000.0)
            if mid_step:
                self._finish_attempt(conn, operation_id, step, now, "interrupted", None)
            return self._append(
                conn,
                operation_id,
                EventKind.INTERRUPTED,
                {"mid_step": mid_step, "step": step, "halt_ms": round(halt_ms, 3)},
                now,
                where=operations.c.status == OperationStatus.RUNNING,
                values={"status": OperationStatus.INTERRUPTED, "finished_at": now},
            )

    def finish_failed(self, operation_id: str, step: int, error: str) -> Event | None:
        now = utcnow()
        with self.engine.begin() as conn:
            self._finish_attempt(conn, operation_id, step, now, "failed", None)
            return self._append(
                conn,
                operation_id,
                EventKind.FAILED,
                {"error": error, "step": step},
                now,
                where=operations.c.status == OperationStatus.RUNNING,
                values={"status": OperationStatus.FAILED, "error": error, "finished_at": now},
            )

    # ----------------------------------------------------------------------------- helpers

    def _append(
        self,
        conn: Connection,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        now: datetime,
        where: ColumnElement[bool] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> Event | None:
        """Compare-and-set the operation row and append the event reporting it, atomically.
        Returns None (and writes nothing) when the row does not match `where`."""
        stmt = (
            update(operations)
            .where(operations.c.id == operation_id)
            .values(last_seq=operations.c.last_seq + 1, updated_at=now, **(values or {}))
            .returning(operations.c.last_seq)
        )
        if where is not None:
            stmt = stmt.where(where)
        seq = conn.execute(stmt).scalar_one_or_none()
        if seq is None:
            return None
        conn.execute(
            insert(events).values(
                operation_id=operation_id,
                seq=seq,
                kind=kind.value,
                data_json=dump_json(data),
                created_at=now,
            )
        )
        return Event(operation_id, seq, kind, data, now)

    def _finish_attempt(
        self,
        conn: Connection,
        operation_id: str,
        step: int,
        now: datetime,
        outcome: str,
        output_json: str | None,
    ) -> None:
        # Only the newest attempt is this runner's; older unfinished ones belong to a process
        # that died mid-step and stay without an outcome.
        latest = (
            select(func.max(steps.c.attempt))
            .where(steps.c.operation_id == operation_id, steps.c.step == step)
            .scalar_subquery()
        )
        conn.execute(
            update(steps)
            .where(
                steps.c.operation_id == operation_id,
                steps.c.step == step,
                steps.c.attempt == latest,
                steps.c.finished_at.is_(None),
            )
            .values(finished_at=now, outcome=outcome, output_json=output_json)
        )

    def _get(self, conn: Connection, operation_id: str) -> Operation | None:
        row = conn.execute(select(operations).where(operations.c.id == operation_id)).first()
        return _operation(row) if row is not None else None

    def _find_by_key(self, key: str, fingerprint: str) -> Operation | None:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(operations).where(operations.c.idempotency_key == key)
            ).first()
        if row is None:
            return None
        if row.request_hash != fingerprint:
            raise AlreadyExists(
                f"idempotency_key {key!r} was already used for operation {row.id} with a "
                "different agent, input or labels; use a new key for a different request"
            )
        return _operation(row)


def _load(text: str | None) -> JSONValue:
    return None if text is None else json.loads(text)


def _operation(row: Row[Any]) -> Operation:
    stop = None
    if row.stop_requested_at is not None:
        stop = StopIntent(row.stop_requested_at, row.stop_requested_by or "", row.stop_reason or "")
    return Operation(
        id=row.id,
        agent=row.agent,
        input=_load(row.input_json),
        idempotency_key=row.idempotency_key,
        labels=_load(row.labels_json) or {},
        status=OperationStatus(row.status),
        steps_completed=row.steps_completed,
        agent_state=_load(row.agent_state_json),
        last_seq=row.last_seq,
        result=_load(row.result_json),
        error=row.error,
        stop=stop,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
    )


def _event(row: Row[Any]) -> Event:
    return Event(
        operation_id=row.operation_id,
        seq=row.seq,
        kind=EventKind(row.kind),
        data=json.loads(row.data_json),
        created_at=row.created_at,
    )
