"""Storage on PostgreSQL: each write is one statement (data-modifying CTEs all run, against one
snapshot, in the statement's own transaction), so a step boundary costs one round trip and one
commit instead of eight; the statements (postgres_sql.py) go through the batcher (pg_batch),
which sends the writes queued together as one query on the event loop. Every write notifies the
other replicas in the same statement (see notifications.py). The runner's writes are in
postgres_steps.py; here, starting, stopping and what else is this database's own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, TextClause, text

from runtime_service.database import Database
from runtime_service.domain import (
    Event,
    EventKind,
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    OperationStatus,
    StopCause,
)
from runtime_service.metrics import POSTGRES_BATCH, StorageMetrics
from runtime_service.notifications import event_note, libpq_url
from runtime_service.storage.claims import ClaimingStorage
from runtime_service.storage.cursors import Cursors
from runtime_service.storage.interface import ClaimFor, Created
from runtime_service.storage.pausing import PausingStorage
from runtime_service.storage.pg_batch import PostgresBatcher, Statement
from runtime_service.storage.postgres_sql import (
    CREATE,
    PEEK_TOMBSTONE,
    RECORD_STOP,
    RELEASE,
    RENEW_LEASES,
    TAKE_TOMBSTONE_AND_STOP,
)
from runtime_service.storage.postgres_steps import PostgresStepWrites
from runtime_service.storage.records import (
    deadline_at,
    halt_data,
    not_recorded,
    request_hash,
    stop_data,
    stopped_ahead_hold,
    utcnow,
)
from runtime_service.storage.shared import tombstone_of, twin_of
from runtime_service.storage.sql import PgSql
from stopline.json_values import dump_json

T = TypeVar("T")
log = logging.getLogger(__name__)

# The session advisory lock of the replica expiring events (retention): any fixed 64-bit key
# no other lock uses; "STOPLINE" in ASCII, read as a number.
RETENTION_LOCK_KEY = int.from_bytes(b"STOPLINE", "big")

# Under its old name too: tests/test_halts.py picks the stop's statement out of the batcher by it.
_RECORD_STOP = RECORD_STOP


# The batchers, each with a connection of its own, that the runner's writes are spread over by
# operation. With one, a batch's statements run on one PostgreSQL backend while the event loop
# waits, and the next batch waits for it: at 10,000 running operations that left both processes
# part idle (bench.capacity: 3,523 steps/s with one, 4,271 with two, the machine 74 % and 93 %
# busy). Batches of two batchers touch different operations, and lock their rows in id order as
# lease renewal does, so they never wait for each other in a cycle.
WRITE_CONNECTIONS = 2


class PostgresStorage(PostgresStepWrites, ClaimingStorage, PausingStorage):
    _RENEW_LEASES = RENEW_LEASES  # postgres_sql.py says why the rows are locked in id order

    def _not_among(self, ids: list[str]) -> tuple[ColumnElement[bool] | TextClause, ...]:
        if not ids:
            return ()
        return (text("NOT (operations.id = ANY(:not_among))").bindparams(not_among=ids),)

    def __init__(
        self,
        db: Database,
        database_url: str,
        meters: StorageMetrics | None = None,
        write_connections: int = WRITE_CONNECTIONS,
    ) -> None:
        super().__init__(db, Cursors(db.engine, "pyformat"), meters)
        observe = self.meters.batch(POSTGRES_BATCH)
        self._batch_took = self.meters.write_path["batch"]
        self.batchers = tuple(
            PostgresBatcher(
                libpq_url(database_url),
                observe=observe,
                translate=self._translation,
                on_write=self._batch_took.observe,
            )
            for _ in range(write_connections)
        )
        self._time = self.cursors.to_db

    async def close(self) -> None:
        for batcher in self.batchers:
            await batcher.close()
        await super().close()

    def batcher_for(self, operation_id: str) -> PostgresBatcher:
        """The batcher that writes this operation: always the same one in this process, so
        one operation's writes keep their order."""
        return self.batchers[hash(operation_id) % len(self.batchers)]

    @asynccontextmanager
    async def retention_turn(self) -> AsyncIterator[bool]:
        """A session advisory lock, on a pooled connection kept for the turn: PostgreSQL gives
        it to one session at a time, and lets go of it when that session's connection dies, so
        a replica that dies mid-turn holds up no other."""
        held = await self._call(self._take_retention_lock)
        if held is None:
            yield False
            return
        try:
            yield True
        finally:
            await self._call(self._give_back_retention_lock, held)

    def _take_retention_lock(self) -> Connection | None:
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            taken = conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": RETENTION_LOCK_KEY}
            ).scalar_one()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        if not taken:
            conn.close()
            return None
        return conn

    @staticmethod
    def _give_back_retention_lock(conn: Connection) -> None:
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": RETENTION_LOCK_KEY})
        except Exception:
            # Closing the session releases the lock; a pooled connection must not keep it.
            log.warning("could not release the retention lock; closing its connection")
            conn.invalidate()
        finally:
            conn.close()

    def _run_soon(
        self, sql: PgSql, params: dict[str, Any], read: Callable[[Any], T]
    ) -> asyncio.Future[T]:
        """One write queued now on its operation's batcher; its future holds the outcome, or
        the error as storage reports it, once the batch has committed."""
        sql.check(params)
        return self.batcher_for(params["id"]).submit(Statement(sql, params, read))

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
        labels = dict(labels or {})
        fingerprint = request_hash(agent, input_value, labels)
        while True:
            now = utcnow()
            held_until = now + timedelta(seconds=hold_seconds) if hold_seconds else None
            held = None if held_until is None else self._time(held_until)
            data: dict[str, JSONValue] = {"agent": agent}
            params = {
                "id": str(uuid.uuid4()) if claim_for is None else claim_for.operation_id,
                "agent": agent,
                "input": dump_json(input_value),
                "hash": fingerprint,
                "key": idempotency_key,
                "owner": owner,
                "labels": dump_json(labels) if labels else None,
                "held_until": held,
                # A private key has no tombstone to find (Storage.create): held as asked.
                "held_if_stopped": held
                if key_private
                else self._time(stopped_ahead_hold(now, held_until)),
                "now": self._time(now),
                "deadline_at": deadline_at(now, deadline_seconds, self._time),
                "max_steps": max_steps,
                "trace_parent": trace_parent,
                "data": dump_json(data),
                "announce": announce,
            }

            if claim_for is not None and held is None and (idempotency_key is None or key_private):
                made = await self._create_and_claim(params, now, data, claim_for)
            else:
                made = await self._run(CREATE, params, partial(self._created, now, data))
            if made is not None:
                if idempotency_key is None or key_private:
                    return made
                # After the commit: the look in the statement (which held the operation) misses
                # a stop by key committed while it ran (READ COMMITTED). As of the create's own
                # time (see Storage.create).
                return await self._stop_ahead(made, owner, idempotency_key, now)
            # The owner's key is taken: the twin, or the conflict. (Not found: the twin's
            # transaction rolled back after ours saw it, so the key is free again.)
            assert idempotency_key is not None
            row = await self._call(self.cursors.find_by_key, owner, idempotency_key)
            twin = twin_of(row, idempotency_key, fingerprint)
            if twin is not None:
                found = Created(twin, created=False, events=())
                if twin.status is OperationStatus.PENDING and twin.stop is None and not key_private:
                    # A retry of a start whose tombstone's stop failed to commit: the tombstone
                    # is still there, and its stop is applied now, before the hold ends.
                    return await self._stop_ahead(found, owner, idempotency_key, utcnow())
                return found

    async def _create_and_claim(
        self, params: dict[str, Any], now: datetime, data: dict[str, JSONValue], claim: ClaimFor
    ) -> Created | None:
        """CREATE and CLAIM_AND_START queued together, so the batcher sends them in one query
        string: one round trip and one transaction (the claim sees the create's row). Should they
        go in two batches, or alone after a failed batch, the claim still follows the create."""
        made = self._run_soon(CREATE, params, partial(self._created, now, data))
        began = self._claim_and_start(
            params["id"], claim.runner_id, claim.lease_seconds, False, now
        )
        began.add_done_callback(lambda f: f.cancelled() or f.exception())  # if made fails first
        created = await made
        claimed = await began
        if created is None or claimed is None:
            return created
        return replace(created, operation=claimed[0].operation, claimed=claimed)

    async def _stop_ahead(self, created: Created, owner: str, key: str, now: datetime) -> Created:
        """Apply a stop stored ahead of the start by its key (a tombstone) to the start's
        operation: read, then taken in the stop's own write (TAKE_TOMBSTONE_AND_STOP)."""
        op_id = created.operation.id
        # "id": the batcher orders a batch's writes by it (pg_batch).
        look = {"id": op_id, "owner": owner, "key": key, "now": self._time(now)}
        tombstone = await self._run(PEEK_TOMBSTONE, look, tombstone_of)
        if tombstone is None:
            return created
        requested_by, reason, cause = tombstone
        params, read = self._stop(op_id, requested_by, reason, cause, owner)
        stopped = await self._run(TAKE_TOMBSTONE_AND_STOP, {**params, "key": key}, read)
        if stopped is None:
            # The stop by key found the operation and recorded the stop itself.
            operation = await self.get(op_id)
            assert operation is not None  # operations are never deleted
            return replace(created, operation=operation)
        return replace(created, operation=stopped.operation, events=created.events + stopped.events)

    def _created(self, now: datetime, data: dict[str, JSONValue], row: Any) -> Created | None:
        if row is None:
            return None
        operation = self.cursors.operation(row)
        created = Event(operation.id, 1, EventKind.CREATED, data, now)
        return Created(operation, created=True, events=(created,))

    async def release(self, operation_id: str, announce: bool = True) -> Operation | None:
        def read(row: Any) -> Operation | None:
            return None if row is None else self.cursors.operation(row)

        return await self._run(RELEASE, {"id": operation_id, "announce": announce}, read)

    async def record_stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
        owner: str = "",
        runner_here: bool = False,
    ) -> InterruptResult | None:
        params, read = self._stop(operation_id, requested_by, reason, cause, owner, runner_here)
        recorded = await self._run(RECORD_STOP, params, read)
        if recorded is not None:
            return recorded
        return not_recorded(await self.get(operation_id), owner)

    def _stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause,
        owner: str,
        runner_here: bool = False,
    ) -> tuple[dict[str, Any], Callable[[Any], InterruptResult | None]]:
        """A stop's parameters, and the reader of its statement's row (RECORD_STOP and
        TAKE_TOMBSTONE_AND_STOP)."""
        now = utcnow()
        data = stop_data(requested_by, reason, cause)
        halt = halt_data(False, 0, 0.0, cause)
        params = {
            "id": operation_id,
            "now": self._time(now),
            "by": requested_by,
            "reason": reason,
            "cause": cause.value,
            "data": dump_json(data),
            "halted": dump_json(halt),
            "owner": owner,
            # A running operation's stop_requested, carried by its notification: the
            # operation's runner is often on another replica, whose watchers then need no read
            # of storage before the terminal event that runner writes next.
            "note": event_note(EventKind.STOP_REQUESTED, data, now),
            "tell_runners": not runner_here,  # see Storage.record_stop
        }

        def read(row: Any) -> InterruptResult | None:
            if row is None:
                return None
            operation = self.cursors.operation(row)
            seq = operation.last_seq
            if operation.status is not OperationStatus.INTERRUPTED:
                stopped = Event(operation_id, seq, EventKind.STOP_REQUESTED, data, now)
                return InterruptResult(InterruptOutcome.ACCEPTED, operation, (stopped,))
            return InterruptResult(
                InterruptOutcome.ACCEPTED,
                operation,
                (
                    Event(operation_id, seq - 1, EventKind.STOP_REQUESTED, data, now),
                    Event(operation_id, seq, EventKind.INTERRUPTED, halt, now),
                ),
            )

        return params, read
