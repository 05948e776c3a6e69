"""Storage on SQLite: each write as fixed SQL, several statements in one transaction, run inline
on the event loop when nothing else is queued, group-committed on the database thread otherwise.

Why both: a SQLite write of the runner takes about a tenth of a millisecond, while handing it to
the database thread and back costs about as much again, plus the wake-up of a core when the
machine is otherwise idle; and with many operations running the queue is rarely empty, so
committing everything queued in one transaction removes most of the cost of a transaction.
The writes a client waits on go the same way: a start's create, a held start's release and a
stop (each hop to the database thread was about half a millisecond of every start and stop).

The statements are in sqlite_sql.py; the runner's writes, in sqlite_steps.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, TextClause, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from runtime_service.database import Database
from runtime_service.domain import (
    EventKind,
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    StopCause,
)
from runtime_service.metrics import SQLITE_GROUP_COMMIT, StorageMetrics
from runtime_service.rows import operation_from_row
from runtime_service.storage.claims import ClaimingStorage
from runtime_service.storage.cursors import Cursors
from runtime_service.storage.errors import unreachable
from runtime_service.storage.interface import ClaimFor, Created
from runtime_service.storage.pausing import PausingStorage
from runtime_service.storage.records import deadline_at as _deadline_at
from runtime_service.storage.records import (
    halt_data,
    not_recorded,
    request_hash,
    stop_data,
    stopped_ahead_hold,
    utcnow,
)
from runtime_service.storage.shared import TAKE_TOMBSTONE, tombstone_of, twin_of
from runtime_service.storage.sqlite_commit import (
    Checkpointer,
    GroupCommit,
    InlineWriter,
    WouldBlock,
    Write,
)
from runtime_service.storage.sqlite_sql import (
    ANY_CLAIMABLE,
    BUMP_TO_ADVANCE,
    CREATE,
    NOT_AMONG,
    RECORD_STOP_IDLE,
    RECORD_STOP_RUNNING,
    RELEASE,
    RENEW_LEASES,
)
from runtime_service.storage.sqlite_steps import INTERRUPTED, STOP_REQUESTED, SqliteStepWrites
from stopline.json_values import dump_json

# Under its old name too: tests/test_write_path.py group-commits a step boundary by hand with it.
_BUMP_TO_ADVANCE = BUMP_TO_ADVANCE

# SQLite's primary result codes that a retry can outlast: the file locked by another connection
# or process, an I/O error, a file that cannot be opened or written right now (a volume away, a
# permission being fixed), a full disk, no memory, a schema changed under a statement. sqlite3
# raises OperationalError for these and also for SQLITE_ERROR, which no retry fixes: a missing
# table or column (a database this runtime's migrations never ran on, or one changed under it).
RETRYABLE_SQLITE_CODES = frozenset({
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_SCHEMA,
})  # fmt: skip


def sqlite_retry_can_fix(exc: SQLAlchemyError) -> bool:
    """errors.unreachable for sqlite3: an OperationalError only when its code is one a retry can
    outlast. (Before, a runtime on a file without its tables answered every call UNAVAILABLE, so
    clients and the gateway's stop delivery retried what could not succeed, and its log said
    "database unavailable".)"""
    if isinstance(exc, OperationalError):
        code = getattr(exc.orig, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in RETRYABLE_SQLITE_CODES  # extended codes keep it in the low byte
    return unreachable(exc)


class SqliteStorage(SqliteStepWrites, ClaimingStorage, PausingStorage):
    _RENEW_LEASES = RENEW_LEASES  # the ids as one JSON array (see sqlite_sql.py)
    _retry_can_fix = staticmethod(sqlite_retry_can_fix)

    def _lease_ids(self, operation_ids: list[str]) -> Any:
        return json.dumps(operation_ids)

    def _maybe_claimable(self, now: datetime, running: list[str]) -> bool:
        """A read first, which takes no lock. The poll's claim transaction took the file's write
        lock, read every running operation's lease under it (10,000 of them at capacity) and
        almost always found nothing; meanwhile no write could run inline on the event loop
        (each found the file locked and queued for the database thread instead)."""
        params = {"now": self._time(now), "not_among": json.dumps(running)}
        with self.cursors.read() as cur:
            cur.execute(ANY_CLAIMABLE.text, params)
            return cur.fetchone() is not None

    def _not_among(self, ids: list[str]) -> tuple[ColumnElement[bool] | TextClause, ...]:
        if not ids:
            return ()
        among = text(NOT_AMONG)
        return (among.bindparams(not_among=json.dumps(ids)),)

    def __init__(self, db: Database, meters: StorageMetrics | None = None) -> None:
        super().__init__(db, Cursors(db.engine, "named"), meters)
        self._inline = InlineWriter(db.engine.url.database, self.cursors.dbapi)
        self._checkpointer = Checkpointer(db.engine.url.database, self.cursors.dbapi)
        self._inline_took = self.meters.write_path["inline"]
        self._group_took = self.meters.write_path["group_commit"]
        self._group = GroupCommit(
            db,
            self._together,
            self._inline,
            observe=self.meters.batch(SQLITE_GROUP_COMMIT),
            translate=self._translation,
            on_write=self._group_wrote,
        )
        self._time = self.cursors.to_db

    async def close(self) -> None:
        await self._checkpointer.close()
        self._inline.close()
        await super().close()

    @asynccontextmanager
    async def retention_turn(self) -> AsyncIterator[bool]:
        """Always this replica's: a SQLite database serves one runtime process."""
        yield True

    # ------------------------------------------------------------------ how writes run

    def _write_soon(self, write: Write, *args: Any, urgent: bool = False) -> asyncio.Future[Any]:
        """A runner write, made or queued now: inline here when nothing else is queued for the
        database thread, else group-committed with whatever is (see GroupCommit; `urgent`, in
        a batch of its own ahead of the others). Its future holds the result, or the error as
        storage reports it, once the write has committed."""
        began = time.monotonic()
        if self._group.idle and self._inline.possible:
            now: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            try:
                result = self._inline.run(write, *args)
            except WouldBlock:
                pass
            except Exception as exc:
                now.set_exception(self._translation(exc))
                return now
            else:
                self._inline_took.observe(time.monotonic() - began)
                self._checkpointer.wrote()
                now.set_result(result)
                return now
        return self._group.submit(write, args, urgent)

    def _group_wrote(self, seconds: float) -> None:
        self._group_took.observe(seconds)
        self._checkpointer.wrote()

    def _together(self, writes: list[tuple[Write, tuple[Any, ...]]]) -> list[Any]:
        """`writes` in one transaction, their outcomes in order; any failure rolls back all of
        them and raises (the group commit then retries each alone)."""
        with self.cursors.transaction() as cur:
            return [write(cur, *args) for write, args in writes]

    # ------------------------------------------------------------------ starting and stopping

    async def create(
        self,
        agent: str,
        input_value: JSONValue,
        idempotency_key: str | None,
        labels: Mapping[str, str] | None = None,
        hold_seconds: float = 0.0,
        owner: str = "",
        announce: bool = True,
        deadline_seconds: float | None = None,
        max_steps: int | None = None,
        trace_parent: str | None = None,
        key_private: bool = False,
        claim_for: ClaimFor | None = None,
    ) -> Created:
        fingerprint = request_hash(agent, input_value, dict(labels or {}))
        fields = (agent, input_value, idempotency_key, dict(labels or {}), hold_seconds, owner)
        limits = (deadline_seconds, max_steps)
        # On the writes' inline path, as record_stop: every start's first step waits on it.
        created: Created = await self._write(
            self._create, fingerprint, *fields, *limits, trace_parent, key_private, claim_for
        )
        return created

    def _create(
        self,
        cur: Any,
        fingerprint: str,
        agent: str,
        input_value: JSONValue,
        key: str | None,
        labels: dict[str, str],
        hold_seconds: float,
        owner: str,
        deadline_seconds: float | None,
        max_steps: int | None,
        trace_parent: str | None = None,
        key_private: bool = False,
        claim_for: ClaimFor | None = None,
    ) -> Created:
        # One transaction from the look for a twin to the tombstone's: a SQLite write holds the
        # database's write lock from its BEGIN IMMEDIATE to its commit, so no start with the same
        # key and no stop by key can commit in between.
        if key is not None:
            twin = twin_of(self.cursors.find_by_key_in(cur, owner, key), key, fingerprint)
            if twin is not None:
                return Created(twin, created=False, events=())
        now = utcnow()
        held_until = now + timedelta(seconds=hold_seconds) if hold_seconds else None
        held = None if held_until is None else self._time(held_until)
        params = {
            "id": str(uuid.uuid4()) if claim_for is None else claim_for.operation_id,
            "agent": agent,
            "input": dump_json(input_value),
            "hash": fingerprint,
            "key": key,
            "owner": owner,
            "labels": dump_json(labels) if labels else None,
            "held_until": held,
            # A private key has no tombstone to find (Storage.create): held as asked, whatever.
            "held_if_stopped": held
            if key_private
            else self._time(stopped_ahead_hold(now, held_until)),
            "now": self._time(now),
            "deadline_at": _deadline_at(now, deadline_seconds, self._time),
            "max_steps": max_steps,
            "trace_parent": trace_parent,
        }
        cur.execute(CREATE.text, params)
        operation = operation_from_row(self.cursors.row(cur))
        event = self._event(cur, operation.id, 1, EventKind.CREATED, {"agent": agent}, now)
        created = Created(operation, created=True, events=(event,))
        if key is None or key_private:
            if claim_for is None or held_until is not None:
                return created
            lease = self._time(now + timedelta(seconds=claim_for.lease_seconds))
            began = self._claim_and_start(cur, operation.id, claim_for.runner_id, lease, now)
            if began is None:
                return created
            return replace(created, operation=began[0].operation, claimed=began)
        # A stop stored ahead by the key (a tombstone) is taken and recorded in this same
        # transaction: the operation is committed interrupted, or not at all.
        cur.execute(TAKE_TOMBSTONE.text, {"owner": owner, "key": key, "now": params["now"]})
        tombstone = tombstone_of(cur.fetchone())
        if tombstone is None:
            return created
        stopped = self._record_stop(cur, operation.id, *tombstone, owner)
        assert stopped is not None  # created PENDING in this transaction, with no stop
        return replace(created, operation=stopped.operation, events=(event, *stopped.events))

    async def release(self, operation_id: str, announce: bool = True) -> Operation | None:
        # On the writes' inline path, as record_stop: a held start's first step waits on it.
        result: Operation | None = await self._write(self._release, operation_id)
        return result

    def _release(self, cur: Any, operation_id: str) -> Operation | None:
        cur.execute(RELEASE.text, {"id": operation_id})
        row = self.cursors.row(cur)
        return None if row is None else operation_from_row(row)

    async def record_stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
        owner: str = "",
        runner_here: bool = False,  # one replica: no other runner to tell
    ) -> InterruptResult | None:
        # A runner write's path (inline when the database thread is idle): the stop is on the
        # path every client waits on, and a hop to the database thread and back costs about
        # as much as the write itself. Ahead of the queue when there is one.
        result: InterruptResult | None = await self._write_first(
            self._record_stop, operation_id, requested_by, reason, cause, owner
        )
        return result

    def _record_stop(
        self,
        cur: Any,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause,
        owner: str,
    ) -> InterruptResult | None:
        now = utcnow()
        params = {
            "id": operation_id,
            "now": self._time(now),
            "by": requested_by,
            "reason": reason,
            "cause": cause.value,
            "owner": owner,
        }
        cur.execute(RECORD_STOP_RUNNING.text, params)
        row = self.cursors.row(cur)
        if row is None:
            cur.execute(RECORD_STOP_IDLE.text, params)
            row = self.cursors.row(cur)
        if row is None:
            return not_recorded(self.cursors.get_in(cur, operation_id), owner)
        operation = operation_from_row(row)
        data = stop_data(requested_by, reason, cause)
        if not operation.status.is_terminal:
            stopped = self._event(cur, operation_id, row.last_seq, STOP_REQUESTED, data, now)
            return InterruptResult(InterruptOutcome.ACCEPTED, operation, (stopped,))
        halt = halt_data(False, 0, 0.0, cause)
        written = self._pair(
            cur, operation_id, row.last_seq - 1, now, STOP_REQUESTED, data, INTERRUPTED, halt
        )
        return InterruptResult(InterruptOutcome.ACCEPTED, operation, written)
