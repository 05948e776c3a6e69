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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from runtime_service.domain import (
    Event,
    EventKind,
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    OperationStatus,
)
from runtime_service.hot_path import HotPath, Statement, halt_ms
from runtime_service.notifications import EVENTS, WORK, notify
from runtime_service.rows import operation_from_row
from runtime_service.schema import events, operations, steps
from stopline.errors import AlreadyExists
from stopline.json_values import shown

ABANDONED = "abandoned"
"""Outcome of an attempt whose runner died (or lost its lease) mid-step, set by the takeover."""

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


@dataclass
class ClaimBatch:
    claimed: list[Claimed] = field(default_factory=list)
    # Orphans that were stopped while their owner was dead, ended here without resuming.
    finished: list[Event] = field(default_factory=list)


def _pending_unheld(now: datetime) -> ColumnElement[bool]:
    """PENDING and not (or no longer) held: claimable."""
    return and_(
        operations.c.status == OperationStatus.PENDING,
        or_(operations.c.held_until.is_(None), operations.c.held_until <= now),
    )


def _running_lease_lapsed(now: datetime) -> ColumnElement[bool]:
    """RUNNING, but its owner stopped renewing the lease: the owner is presumed dead."""
    return and_(
        operations.c.status == OperationStatus.RUNNING,
        or_(operations.c.lease_expires_at.is_(None), operations.c.lease_expires_at <= now),
    )


def _owned_by(runner_id: str) -> ColumnElement[bool]:
    """Fencing: the operation is still RUNNING under this runner."""
    return and_(operations.c.status == OperationStatus.RUNNING, operations.c.runner_id == runner_id)


class OperationStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The runner's hot writes, as fixed SQL (see hot_path.py).
        self.hot = HotPath(engine)

    # ----------------------------------------------------------------------------- reads

    def get(self, operation_id: str) -> Operation | None:
        return self.hot.get(operation_id)

    def list_page(
        self, status: str | None, limit: int, after: ListCursor | None, owner: str | None = None
    ) -> tuple[list[Operation], ListCursor | None]:
        """A page of operations newest first, and the cursor of the next page (None at the end)."""
        query = select(operations)
        if owner is not None:
            query = query.where(operations.c.owner == owner)
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
        page = [operation_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        cursor = ListCursor(page[-1].created_at, page[-1].id) if more and page else None
        return page, cursor

    def events_after(self, operation_id: str, after_seq: int, limit: int = 1000) -> list[Event]:
        return self.hot.events_after(operation_id, after_seq, limit)

    def step_records(self, operation_id: str) -> list[Row[Any]]:
        """Every attempt at every step of an operation, for audits and tests."""
        query = (
            select(steps)
            .where(steps.c.operation_id == operation_id)
            .order_by(steps.c.step, steps.c.attempt)
        )
        with self.engine.begin() as conn:
            return list(conn.execute(query).all())

    # ----------------------------------------------------------------------------- writes

    def create(
        self,
        agent: str,
        input_value: JSONValue,
        idempotency_key: str | None,
        labels: Mapping[str, str] | None = None,
        hold_seconds: float = 0.0,
        owner: str = "",
    ) -> Created:
        """Insert a PENDING operation and its `created` event, or find the idempotent twin
        (keys are scoped by owner)."""
        labels = dict(labels or {})
        fingerprint = request_hash(agent, input_value, labels)
        if idempotency_key is not None:
            existing = self._find_by_key(owner, idempotency_key, fingerprint)
            if existing is not None:
                return Created(existing, created=False, events=())
        op_id, columns, held_until, now = self._new(
            agent, input_value, idempotency_key, labels, hold_seconds, owner
        )
        try:
            with self.hot.transaction() as cursor:
                operation, event = self.hot.create_in(cursor, op_id, columns, held_until, now)
        except IntegrityError:
            # Lost a race with a concurrent start using the same key: return the winner.
            if idempotency_key is None:
                raise
            existing = self._find_by_key(owner, idempotency_key, fingerprint)
            if existing is None:
                raise
            return Created(existing, created=False, events=())
        return Created(operation, created=True, events=(event,))

    def create_statement(
        self,
        agent: str,
        input_value: JSONValue,
        idempotency_key: str | None,
        labels: Mapping[str, str] | None = None,
        hold_seconds: float = 0.0,
        owner: str = "",
        announce: bool = True,
    ) -> Statement[Created | None]:
        """create as one PostgreSQL statement (see pg_batch), for a start that is most likely
        new; None when the key is taken: then `create` finds the twin (or the conflict)."""
        fields = self._new(
            agent, input_value, idempotency_key, dict(labels or {}), hold_seconds, owner
        )
        made = self.hot.create_statement(*fields, announce=announce)
        return made.then(lambda found: Created(found[0], created=True, events=(found[1],)))

    @staticmethod
    def _new(
        agent: str,
        input_value: JSONValue,
        idempotency_key: str | None,
        labels: dict[str, str],
        hold_seconds: float,
        owner: str,
    ) -> tuple[str, dict[str, Any], datetime | None, datetime]:
        """A new operation's id, columns, hold and creation time."""
        now = utcnow()
        columns = {
            "agent": agent,
            "input": dump_json(input_value),
            "hash": request_hash(agent, input_value, labels),
            "key": idempotency_key,
            "owner": owner,
            "labels": dump_json(labels) if labels else None,
        }
        held_until = now + timedelta(seconds=hold_seconds) if hold_seconds else None
        return str(uuid.uuid4()), columns, held_until, now

    def release(self, operation_id: str) -> bool:
        """End a hold: the operation becomes claimable now. False if it was not held."""
        return self.hot.release(operation_id)

    def record_stop_statement(
        self, operation_id: str, requested_by: str, reason: str
    ) -> Statement[InterruptResult | None]:
        """record_stop as one PostgreSQL statement (see pg_batch) for a stop that is most
        likely new; None when nothing was recorded: then `record_stop` says why."""
        made = self.hot.record_stop_statement(operation_id, requested_by, reason, utcnow())
        return made.then(
            lambda found: InterruptResult(InterruptOutcome.ACCEPTED, found[0], tuple(found[1]))
        )

    def record_stop(
        self, operation_id: str, requested_by: str, reason: str
    ) -> InterruptResult | None:
        """Store the stop intent once. A PENDING operation is interrupted right here, so no
        runner can ever start a step of it. Returns None for an unknown id."""
        with self.hot.transaction() as cursor:
            recorded = self.hot.record_stop_in(cursor, operation_id, requested_by, reason, utcnow())
            operation = self.hot.get_in(cursor, operation_id)
        if operation is None:
            return None
        if recorded is not None:
            return InterruptResult(InterruptOutcome.ACCEPTED, operation, tuple(recorded))
        if operation.stop is not None:
            return InterruptResult(InterruptOutcome.ALREADY_REQUESTED, operation)
        return InterruptResult(InterruptOutcome.ALREADY_FINISHED, operation)

    def claim(self, operation_id: str, runner_id: str, lease_seconds: float) -> Claimed | None:
        """Fast path after a start on this replica: take this PENDING, unheld operation.
        None when another replica took it first, it is held, or it was stopped."""
        taken = self.hot.claim(operation_id, runner_id, lease_seconds)
        return None if taken is None else Claimed(*taken)

    def claim_next(self, runner_id: str, limit: int, lease_seconds: float) -> ClaimBatch:
        """Take up to `limit` claimable operations: PENDING ones (not held), and RUNNING ones
        whose owner's lease ran out (a dead replica's work, resumed from its last checkpoint).

        FOR UPDATE SKIP LOCKED lets replicas claim concurrently without ever taking the same
        row; each take is still a compare-and-set, so even without row locks (SQLite, where
        there is one replica) an operation is never claimed twice."""
        now = utcnow()
        claimable = or_(_pending_unheld(now), _running_lease_lapsed(now))
        query = (
            select(operations.c.id, operations.c.status, operations.c.stop_requested_at)
            .where(claimable)
            .order_by(operations.c.created_at, operations.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        batch = ClaimBatch()
        with self.engine.begin() as conn:
            for row in conn.execute(query).all():
                if row.status == OperationStatus.RUNNING and row.stop_requested_at is not None:
                    # Stopped while its owner was dead: end it, never resume it.
                    event = self._halt_orphan(conn, row.id, now)
                    if event is not None:
                        batch.finished.append(event)
                    continue
                claimed = self._take(
                    conn,
                    row.id,
                    runner_id,
                    now,
                    lease_seconds,
                    where=claimable,
                    resumed=row.status == OperationStatus.RUNNING,
                )
                if claimed is not None:
                    batch.claimed.append(claimed)
        return batch

    def renew_leases(
        self, runner_id: str, operation_ids: list[str], lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        """Extend this runner's leases. Returns (still owned, owned with a stop recorded): the
        second set is the periodic fallback for a stop notification that never arrived."""
        if not operation_ids:
            return set(), set()
        ours = (
            operations.c.id.in_(operation_ids),
            operations.c.runner_id == runner_id,
            operations.c.status == OperationStatus.RUNNING,
        )
        # Lock the rows in id order first, as the PostgreSQL batcher does (pg_batch), so that this
        # and a batch of step writes never wait for each other in a cycle (PostgreSQL would
        # break such a deadlock only after a second). SQLite has one writer and no FOR UPDATE.
        locked = select(operations.c.id).where(*ours).order_by(operations.c.id).with_for_update()
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(operations)
                .where(operations.c.id.in_(locked), *ours)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
                .returning(operations.c.id, operations.c.stop_requested_at)
            ).all()
        return {r.id for r in rows}, {r.id for r in rows if r.stop_requested_at is not None}

    def drop_leases(self, runner_id: str) -> int:
        """Graceful shutdown: let other replicas take this runner's operations at once."""
        with self.engine.begin() as conn:
            dropped = conn.execute(
                update(operations)
                .where(
                    operations.c.runner_id == runner_id,
                    operations.c.status == OperationStatus.RUNNING,
                )
                .values(lease_expires_at=utcnow())
            ).rowcount
            if dropped:
                notify(conn, WORK)
            return dropped

    def expire_all_leases(self) -> int:
        """Single-replica start-up (SQLite): whoever ran these operations is gone."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(operations)
                .where(operations.c.status == OperationStatus.RUNNING)
                .values(lease_expires_at=utcnow())
            ).rowcount

    def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        """Record that a step begins (an attempt row and a `step_started` event); None when the
        operation is no longer this runner's to run or a stop is recorded."""
        return self.hot.start_step(operation_id, step, runner_id)

    def append_chunk(
        self,
        operation_id: str,
        step: int,
        text: str,
        runner_id: str,
        outlives_stop: bool = False,
    ) -> Event | None:
        """Store an output chunk; None when the operation has ended or changed hands, or a stop
        is recorded (a step that keeps emitting once stopped gets its output dropped), unless
        `outlives_stop` (see HotPath.append_chunk_in)."""
        return self.hot.append_chunk(operation_id, step, text, runner_id, outlives_stop)

    def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        """Checkpoint a step that was not the last and begin the next, in one transaction
        (see HotPath.advance for what the returned events mean)."""
        return self.hot.advance(operation_id, step, output, state, runner_id)

    def complete_step(
        self,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        done: bool,
        runner_id: str,
    ) -> list[Event]:
        """Checkpoint a finished step and, if it was the last, complete the operation.

        Completion is refused when a stop was recorded first: the stop wins, and the runner then
        ends the operation INTERRUPTED at this boundary. Empty list: no longer this runner's."""
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
                where=_owned_by(runner_id),
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
                    where=and_(_owned_by(runner_id), operations.c.stop_requested_at.is_(None)),
                    values={
                        "status": OperationStatus.COMPLETED,
                        "result_json": output_json,
                        "finished_at": now,
                    },
                )
                if final is not None:
                    written.append(final)
            return written

    def finish_interrupted(
        self, operation_id: str, step: int, mid_step: bool, runner_id: str
    ) -> Event | None:
        """RUNNING -> INTERRUPTED after the runner halted (see HotPath.finish_interrupted_in)."""
        return self.hot.finish_interrupted(operation_id, step, mid_step, runner_id)

    def finish_failed(
        self, operation_id: str, step: int, error: str, runner_id: str
    ) -> Event | None:
        now = utcnow()
        with self.engine.begin() as conn:
            failed = self._append(
                conn,
                operation_id,
                EventKind.FAILED,
                {"error": error, "step": step},
                now,
                where=_owned_by(runner_id),
                values={"status": OperationStatus.FAILED, "error": error, "finished_at": now},
            )
            if failed is not None:  # the attempt is ours to settle only while the operation is
                self._finish_attempt(conn, operation_id, step, now, "failed", None)
            return failed

    def _take(
        self,
        conn: Connection,
        operation_id: str,
        runner_id: str,
        now: datetime,
        lease_seconds: float,
        where: ColumnElement[bool],
        resumed: bool,
    ) -> Claimed | None:
        steps_completed = conn.execute(
            select(operations.c.steps_completed).where(operations.c.id == operation_id)
        ).scalar_one_or_none()
        if steps_completed is None:
            return None
        event = self._append(
            conn,
            operation_id,
            EventKind.STARTED,
            {"from_step": steps_completed, "resumed": resumed},
            now,
            where=where,
            values={
                "status": OperationStatus.RUNNING,
                "runner_id": runner_id,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
                "held_until": None,
            },
        )
        if event is None:
            return None
        if resumed:
            self._settle_abandoned(conn, operation_id, now)
        operation = self._get(conn, operation_id)
        assert operation is not None
        return Claimed(operation, event)

    def _halt_orphan(self, conn: Connection, operation_id: str, now: datetime) -> Event | None:
        """End an operation stopped while its owner was dead. If the owner died in the middle
        of a step (its attempt never finished), that step was cut: the halt says so."""
        step = conn.execute(
            select(operations.c.steps_completed).where(operations.c.id == operation_id)
        ).scalar_one()
        cut = conn.execute(
            select(steps.c.attempt).where(
                steps.c.operation_id == operation_id,
                steps.c.step == step,
                steps.c.finished_at.is_(None),
            )
        ).first()
        event = self._interrupt(
            conn, operation_id, step, cut is not None, now, _running_lease_lapsed(now)
        )
        if event is not None:
            self._settle_abandoned(conn, operation_id, now)
        return event

    @staticmethod
    def _settle_abandoned(conn: Connection, operation_id: str, now: datetime) -> None:
        """Whoever takes over or halts an operation whose owner died settles that owner's
        unfinished attempt: outcome `abandoned`, finished when the takeover learned of it."""
        conn.execute(
            update(steps)
            .where(steps.c.operation_id == operation_id, steps.c.finished_at.is_(None))
            .values(finished_at=now, outcome=ABANDONED)
        )

    def _interrupt(
        self,
        conn: Connection,
        operation_id: str,
        step: int,
        mid_step: bool,
        now: datetime,
        where: ColumnElement[bool],
    ) -> Event | None:
        requested_at = conn.execute(
            select(operations.c.stop_requested_at).where(operations.c.id == operation_id)
        ).scalar_one_or_none()
        return self._append(
            conn,
            operation_id,
            EventKind.INTERRUPTED,
            {"mid_step": mid_step, "step": step, "halt_ms": halt_ms(now, requested_at, None)},
            now,
            where=where,
            values={"status": OperationStatus.INTERRUPTED, "finished_at": now},
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
        notify(conn, EVENTS, f"{operation_id}:{seq}")  # watchers on other replicas
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
        # Only the newest attempt is this runner's (older ones were settled as abandoned when
        # this runner took the operation over).
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
        return operation_from_row(row) if row is not None else None

    def _find_by_key(self, owner: str, key: str, fingerprint: str) -> Operation | None:
        row = self.hot.find_by_key(owner, key)
        if row is None:
            return None
        if row.request_hash != fingerprint:
            raise AlreadyExists(
                f"idempotency_key {shown(key)} was already used for operation {row.id} with a "
                "different agent, input or labels; use a new key for a different request"
            )
        return operation_from_row(row)
