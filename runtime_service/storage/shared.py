"""What both dialects share: the plumbing (the database threads, failures as domain errors), the
reads that exist once (a page of the list, step records), the stops by key, and the pieces of the
writes that claims.py and waiting.py make, as SQLAlchemy Core on the database threads; and the
reads watchers repeat, as fixed SQL (cursors.py). Each dialect's module adds its writes, and
composes this with claims.py (claims and leases) and waiting.py (waiting for a person).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from runtime_service.database import Database
from runtime_service.domain import (
    Event,
    EventKind,
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    OperationStatus,
    RecordedAhead,
    StopCause,
)
from runtime_service.metrics import StorageMetrics
from runtime_service.notifications import events_channel, notify
from runtime_service.rows import operation_from_row
from runtime_service.schema import events, operations, steps, stop_tombstones
from runtime_service.storage.cursors import Cursors
from runtime_service.storage.errors import Unreachable, translated, translation, unreachable
from runtime_service.storage.expiry import expire_batch
from runtime_service.storage.interface import (
    Appended,
    ExpiredBatch,
    ListCursor,
    StepRecord,
    Tombstone,
)
from runtime_service.storage.records import ABANDONED, STOPPING, utcnow
from runtime_service.storage.sql import Sql
from stopline.errors import AlreadyExists
from stopline.events import TOOL_CALL_ENDINGS
from stopline.json_values import dump_json, shown

P = ParamSpec("P")

OUTCOME_UNKNOWN_REASON = (
    "the runtime running this tool call stopped mid-call (crashed or lost its lease); "
    "whether the tool's effect happened is unknown"
)
T = TypeVar("T")

# Consume the owner's live tombstone of a key: a start's on SQLite (in its create's transaction,
# with the stop it carries) and a stop by key's that found the key's operation after writing its
# own. (A start on PostgreSQL takes it with its stop: postgres_sql.TAKE_TOMBSTONE_AND_STOP.)
TAKE_TOMBSTONE = Sql("""
DELETE FROM stop_tombstones
WHERE owner = :owner AND idempotency_key = :key AND expires_at > :now
RETURNING requested_by, reason, cause""")


def tombstone_of(row: Any) -> Tombstone | None:
    """A TAKE_TOMBSTONE row as the stop it carries."""
    return None if row is None else (row[0], row[1], StopCause(row[2]))


class SharedStorage:
    """The part of Storage both dialects run alike; see claims.py and waiting.py for the rest of
    it, and sqlite.py and postgres.py for each dialect's writes."""

    def __init__(self, db: Database, cursors: Cursors, meters: StorageMetrics | None) -> None:
        self.db = db
        self.engine: Engine = db.engine
        self.cursors = cursors
        self.meters = meters if meters is not None else StorageMetrics()
        self._unavailable = self.meters.unavailable.inc

    # Which failures a retry can outlast (errors.py); a dialect whose driver says it otherwise
    # overrides it (SqliteStorage).
    _retry_can_fix: Unreachable = staticmethod(unreachable)

    def _translation(self, exc: BaseException) -> BaseException:
        """What a queued write's failure reaches its caller as (each dialect's write queue
        settles its callers' futures with it)."""
        return translation(exc, self._unavailable, self._retry_can_fix)

    @property
    def dialect(self) -> str:
        return self.db.backend

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn on the database threads; its failures as domain errors."""
        took = self.meters.call(fn.__name__)
        began = time.monotonic()
        try:
            with translated(self._unavailable, self._retry_can_fix):
                return await self.db.call(fn, *args, **kwargs)
        finally:
            took.observe(time.monotonic() - began)

    async def close(self) -> None:
        self.db.close()

    async def append(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> Appended | None:
        return await self.append_soon(operation_id, kind, data, runner_id, outlives_stop)

    def append_soon(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> asyncio.Future[Appended | None]:
        raise NotImplementedError  # each dialect's module writes it

    async def record_stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
    ) -> InterruptResult | None:
        raise NotImplementedError  # each dialect's module writes it

    def _pause_orphan(self, conn: Connection, operation_id: str, now: datetime) -> list[Event]:
        raise NotImplementedError  # storage/waiting.py (claims.py calls it)

    # ------------------------------------------------------------------ stops by key

    async def record_stop_by_key(
        self,
        owner: str,
        key: str,
        requested_by: str,
        reason: str,
        cause: StopCause,
        expires_seconds: float,
    ) -> InterruptResult | RecordedAhead:
        """See Storage.record_stop_by_key. Safe against a racing start without locks: each side
        commits its own row, then looks for the other's (the start: in `create`, after its
        create committed, or in the same transaction on SQLite, whose write lock orders the
        two). Whichever looks second sees the first's row, so at least one of them
        applies the stop; both may, and the second finds it recorded (record_stop is
        idempotent). This side records the stop before removing the tombstone, and the start
        looks before its operation can run when it is held: by the start itself, or by a create
        that saw the tombstone (stopped_ahead_hold). So a stop recorded before the create, or
        racing a held start, lands before any step whichever side applies it. (An unheld start
        whose create ran while this tombstone was being committed is not held: a runner may
        claim it first, and the stop then reaches it RUNNING.)"""
        row = await self._call(self.cursors.find_by_key, owner, key)
        if row is None:
            written = await self._call(
                self._write_tombstone, owner, key, requested_by, reason, cause, expires_seconds
            )
            row = await self._call(self.cursors.find_by_key, owner, key)
            if row is None:
                return RecordedAhead(
                    InterruptOutcome.RECORDED_AHEAD
                    if written
                    else InterruptOutcome.ALREADY_REQUESTED
                )
            # A start with the key committed meanwhile: the stop applies to its operation. It is
            # recorded before the tombstone goes, so a start that no longer finds the tombstone
            # finds its operation stopped (and one that still finds it records the stop too).
            result = await self.record_stop(row.id, requested_by, reason, cause)
            await self._call(self._take_tombstone, owner, key)
        else:
            result = await self.record_stop(row.id, requested_by, reason, cause)
        assert result is not None  # operations are never deleted
        return result

    def _write_tombstone(
        self,
        owner: str,
        key: str,
        requested_by: str,
        reason: str,
        cause: StopCause,
        expires_seconds: float,
    ) -> bool:
        """Store the tombstone; False when a live one is there already. Expired tombstones (of
        every key) are removed first: the cleanup is this opportunistic."""
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(stop_tombstones).where(stop_tombstones.c.expires_at <= now))
                conn.execute(
                    insert(stop_tombstones).values(
                        owner=owner,
                        idempotency_key=key,
                        requested_by=requested_by,
                        reason=reason,
                        cause=cause.value,
                        requested_at=now,
                        expires_at=now + timedelta(seconds=expires_seconds),
                    )
                )
        except IntegrityError:
            return False
        return True

    def _take_tombstone(self, owner: str, key: str) -> Tombstone | None:
        """Consume the live tombstone of this key, or None."""
        params = {"owner": owner, "key": key, "now": self.cursors.to_db(utcnow())}
        with self.cursors.transaction() as cur:
            cur.execute(self.cursors.sql(TAKE_TOMBSTONE), params)
            return tombstone_of(cur.fetchone())

    async def chunk(
        self, operation_id: str, step: int, text: str, runner_id: str, outlives_stop: bool
    ) -> Event | None:
        data: dict[str, JSONValue] = {"step": step, "text": text}
        appended = await self.append(
            operation_id, EventKind.OUTPUT_CHUNK, data, runner_id, outlives_stop
        )
        return None if appended is None else appended.event

    # ----------------------------------------------------------------------------- reads

    async def get(self, operation_id: str) -> Operation | None:
        return await self._call(self.cursors.get, operation_id)

    async def events_after(
        self, operation_id: str, after_seq: int, limit: int = 1000
    ) -> list[Event]:
        return await self._call(self.cursors.events_after, operation_id, after_seq, limit)

    async def list_page(
        self, status: str | None, limit: int, after: ListCursor | None, owner: str | None = None
    ) -> tuple[list[Operation], ListCursor | None]:
        return await self._call(self._list_page, status, limit, after, owner)

    async def step_records(self, operation_id: str) -> list[StepRecord]:
        return await self._call(self._step_records, operation_id)

    async def expire_events(self, cutoff: datetime, batch_size: int) -> ExpiredBatch:
        return await self._call(expire_batch, self.engine, cutoff, batch_size, utcnow())

    # ----------------------------------------------------------------------------- on the threads

    def _list_page(
        self, status: str | None, limit: int, after: ListCursor | None, owner: str | None
    ) -> tuple[list[Operation], ListCursor | None]:
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

    def _step_records(self, operation_id: str) -> list[StepRecord]:
        query = (
            select(
                steps.c.step,
                steps.c.attempt,
                steps.c.runner_id,
                steps.c.started_at,
                steps.c.finished_at,
                steps.c.outcome,
                steps.c.output_json,
            )
            .where(steps.c.operation_id == operation_id)
            .order_by(steps.c.step, steps.c.attempt)
        )
        with self.engine.begin() as conn:
            return [StepRecord(*row) for row in conn.execute(query).all()]

    # ------------------------------------------------------------------ pieces of writes

    def _settle_open_calls(
        self, conn: Connection, operation_id: str, now: datetime, where: ColumnElement[bool]
    ) -> list[Event]:
        """Settle the tool calls a dead owner left open as `tool_call_outcome_unknown`, in the
        transaction that takes the operation over (or halts it), so every started call has
        exactly one ending before the step runs again. The event log is the call table: a call
        is open when its tool_call_started has no ending with the same call_id."""
        kinds = [EventKind.TOOL_CALL_STARTED.value, *sorted(TOOL_CALL_ENDINGS)]
        rows = conn.execute(
            select(events.c.kind, events.c.data_json)
            .where(events.c.operation_id == operation_id, events.c.kind.in_(kinds))
            .order_by(events.c.seq)
        ).all()
        open_calls: dict[str, int] = {}
        for kind, data_json in rows:
            data = json.loads(data_json)
            if kind == EventKind.TOOL_CALL_STARTED:
                open_calls[data["call_id"]] = data["step"]
            else:
                open_calls.pop(data["call_id"], None)
        settled = []
        for call_id, step in open_calls.items():
            data = {"step": step, "call_id": call_id, "reason": OUTCOME_UNKNOWN_REASON}
            event = self._append(
                conn, operation_id, EventKind.TOOL_CALL_OUTCOME_UNKNOWN, data, now, where, {}
            )
            if event is not None:
                settled.append(event)
        return settled

    @staticmethod
    def _settle_abandoned(conn: Connection, operation_id: str, now: datetime) -> None:
        """Whoever takes over or halts an operation whose owner died settles that owner's
        unfinished attempt: outcome `abandoned`, finished when the takeover learned of it."""
        conn.execute(
            update(steps)
            .where(steps.c.operation_id == operation_id, steps.c.finished_at.is_(None))
            .values(finished_at=now, outcome=ABANDONED)
        )

    @staticmethod
    def _append(
        conn: Connection,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        now: datetime,
        where: ColumnElement[bool],
        values: Mapping[str, Any],
    ) -> Event | None:
        """Compare-and-set the operation row and append the event reporting it, atomically.
        Returns None (and writes nothing) when the row does not match `where`."""
        seq = conn.execute(
            update(operations)
            .where(operations.c.id == operation_id, where)
            .values(last_seq=operations.c.last_seq + 1, updated_at=now, **values)
            .returning(operations.c.last_seq)
        ).scalar_one_or_none()
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
        notify(conn, events_channel(operation_id), f"{operation_id}:{seq}")  # their watchers
        return Event(operation_id, seq, kind, data, now)


def twin_of(row: Any, key: str, fingerprint: str) -> Operation | None:
    """The operation a start with this key and request fingerprint finds, if any; AlreadyExists
    when the key was used for a different request."""
    if row is None:
        return None
    if row.request_hash != fingerprint:
        raise AlreadyExists(
            f"idempotency_key {shown(key)} was already used for operation {row.id} with a "
            "different agent, input or labels; use a new key for a different request"
        )
    return operation_from_row(row)
