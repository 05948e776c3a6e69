"""Storage on PostgreSQL: each write is one statement (data-modifying CTEs all run, against one
snapshot, in the statement's own transaction), so a step boundary costs one round trip and one
commit instead of eight; the statements go through the batcher (pg_batch), which sends the
writes queued together as one query on the event loop. Every write notifies the other replicas
in the same statement (see notifications.py).
"""

from __future__ import annotations

import json
import logging
import time
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
from runtime_service.notifications import EVENTS, STOPS, WORK, libpq_url
from runtime_service.storage.cursors import COLUMN_LIST, COLUMNS, Cursors
from runtime_service.storage.errors import translated
from runtime_service.storage.interface import (
    Appended,
    Claimed,
    Created,
    KeptState,
    deadline_at,
    halt_data,
    request_hash,
    stop_data,
    stopped_ahead_hold,
    utcnow,
)
from runtime_service.storage.pg_batch import PostgresBatcher, Statement
from runtime_service.storage.shared import twin_of
from runtime_service.storage.sql import PgSql, Sql
from runtime_service.storage.waiting import WaitingStorage
from stopline.json_values import dump_json

T = TypeVar("T")
log = logging.getLogger(__name__)

# The session advisory lock of the replica expiring events (retention): any fixed 64-bit key
# no other lock uses; "STOPLINE" in ASCII, read as a number.
RETENTION_LOCK_KEY = int.from_bytes(b"STOPLINE", "big")

TEXT, INT, BOOL, TIME = "text", "integer", "boolean", "timestamptz"

# Owned by this runner and still running: the fencing condition of every runner write.
_OWNED = "id = :id AND status = 'RUNNING' AND runner_id = :runner"
_OWNED_TYPES = {"id": TEXT, "runner": TEXT, "now": TIME}
_NOTIFY_EVENT = f"pg_notify('{EVENTS}', :id || ':' || last_seq)"


def _finish_attempt(outcome: str, output: str = "NULL", when: str = "TRUE") -> str:
    """A CTE that settles the newest attempt at :step, in a statement whose `op` CTE wrote the
    operation (only the newest attempt is this runner's: older ones were settled as abandoned
    when it took the operation over)."""
    return f"""finished AS (
  UPDATE steps SET finished_at = :now, outcome = '{outcome}', output_json = {output}
  WHERE {when} AND operation_id = :id AND step = :step AND finished_at IS NULL
    AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)
    AND EXISTS (SELECT 1 FROM op)
)"""


# A new operation and its `created` event; no row when the owner's idempotency key is taken.
# Held (`:held_if_stopped`, see stopped_ahead_hold) when a live stop by its key is already
# committed, so no runner claims it, nor hears of it, before the start applies that stop. (The
# casts: an untyped :key or :owner would be deduced varchar by the INSERT and text by `=`.)
_CREATE = PgSql(
    f"""
WITH created AS (
  INSERT INTO operations (id, agent, input_json, request_hash, idempotency_key, owner,
    labels_json, status, steps_completed, last_seq, held_until, created_at, updated_at,
    deadline_at, max_steps, trace_parent)
  VALUES (:id, :agent, :input, :hash, :key, :owner, :labels, 'PENDING', 0, 1,
    CASE WHEN EXISTS (SELECT 1 FROM stop_tombstones
      WHERE owner = :owner::varchar AND idempotency_key = :key::varchar AND expires_at > :now)
    THEN :held_if_stopped ELSE :held_until END,
    :now, :now, :deadline_at, :max_steps, :trace_parent)
  ON CONFLICT (owner, idempotency_key) DO NOTHING
  RETURNING {COLUMN_LIST}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT id, 1, 'created', :data, :now FROM created
)
SELECT {COLUMN_LIST}, CASE WHEN :announce AND held_until IS NULL THEN pg_notify('{WORK}', '') END
FROM created""",
    id=TEXT, agent=TEXT, input=TEXT, hash=TEXT, key=TEXT, owner=TEXT, labels=TEXT,
    held_until=TIME, held_if_stopped=TIME, now=TIME, data=TEXT, announce=BOOL, deadline_at=TIME,
    max_steps=INT, trace_parent=TEXT,
)  # fmt: skip

_RELEASE = PgSql(
    f"""
WITH released AS (
  UPDATE operations SET held_until = NULL
  WHERE id = :id AND status = 'PENDING' AND held_until IS NOT NULL
  RETURNING {COLUMN_LIST}
)
SELECT {COLUMN_LIST}, CASE WHEN :announce THEN pg_notify('{WORK}', '') END FROM released""",
    id=TEXT, announce=BOOL,
)  # fmt: skip

# The stop intent, recorded once. An operation with no step in flight (PENDING, WAITING, PAUSED)
# is interrupted in the same UPDATE (SET sees the old row, so `status` there is the status before
# the stop); a RUNNING one's runner is told.
_RECORD_STOP = PgSql(
    f"""
WITH stopped AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN status <> 'RUNNING' THEN 2 ELSE 1 END,
    updated_at = :now, stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason,
    stop_cause = :cause,
    status = CASE WHEN status <> 'RUNNING' THEN 'INTERRUPTED' ELSE status END,
    finished_at = CASE WHEN status <> 'RUNNING' THEN :now ELSE finished_at END
  WHERE id = :id AND status IN ('PENDING', 'RUNNING', 'WAITING', 'PAUSED')
  AND stop_requested_at IS NULL
  RETURNING {COLUMN_LIST}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN status = 'INTERRUPTED' THEN 1 ELSE 0 END, 'stop_requested',
    :data, :now FROM stopped
  UNION ALL
  SELECT :id, last_seq, 'interrupted', :halted, :now FROM stopped WHERE status = 'INTERRUPTED'
)
SELECT {COLUMN_LIST}, {_NOTIFY_EVENT},
  CASE WHEN status = 'RUNNING' THEN pg_notify('{STOPS}', :id) END
FROM stopped""",
    id=TEXT, now=TIME, by=TEXT, reason=TEXT, cause=TEXT, data=TEXT, halted=TEXT,
)  # fmt: skip

# Claim a locally started operation and begin its first step; a PENDING operation never has a
# stop recorded (recording one interrupts it), so the step always begins.
_CLAIM_AND_START = PgSql(
    f"""
WITH claimed AS (
  UPDATE operations SET status = 'RUNNING', runner_id = :runner, lease_expires_at = :lease,
    held_until = NULL, last_seq = last_seq + 2, updated_at = :now
  WHERE id = :id AND status = 'PENDING' AND (held_until IS NULL OR held_until <= :now)
  RETURNING {COLUMN_LIST}
), attempt AS (
  SELECT count(*) + 1 AS n FROM steps
  WHERE operation_id = :id AND step = (SELECT steps_completed FROM claimed)
), began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, steps_completed, attempt.n, :runner, :now FROM claimed, attempt
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - 1, 'started',
    -- (',"resumed":' and 'false}}' apart: a colon before a word would read as a parameter)
    '{{"from_step":' || steps_completed || ',"resumed":' || 'false}}', :now FROM claimed
  UNION ALL
  SELECT :id, last_seq, 'step_started',
    '{{"step":' || steps_completed || ',"attempt":' || attempt.n || '}}', :now
  FROM claimed, attempt
)
SELECT {COLUMN_LIST}, attempt.n, {_NOTIFY_EVENT}
FROM claimed, attempt""",
    **_OWNED_TYPES, lease=TIME,
)  # fmt: skip

_START_STEP = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
  WHERE {_OWNED} AND stop_requested_at IS NULL
  RETURNING last_seq
), attempt AS (
  SELECT count(*) + 1 AS n FROM steps WHERE operation_id = :id AND step = :step
), began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, :step, attempt.n, :runner, :now FROM op, attempt
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'step_started',
    '{{"step":' || :step || ',"attempt":' || attempt.n || '}}', :now
  FROM op, attempt
)
SELECT last_seq, attempt.n, {_NOTIFY_EVENT} FROM op, attempt""",
    **_OWNED_TYPES, step=INT,
)  # fmt: skip

# An event of the step in flight (every kind: output, deltas, agent events, tool call records).
# Output is stored only while no stop is recorded, so once a stop_requested event is stored no
# output follows it, only the halt. `:outlives_stop` lifts that for records allowed between the
# stop and the halt (settling tool calls, deltas passed before the stop reached the step) and
# for the stop-at-boundary mode, where the step in flight runs to its end and its output is kept.
_APPEND = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
  WHERE {_OWNED} AND (stop_requested_at IS NULL OR :outlives_stop)
  RETURNING last_seq, stop_requested_at IS NOT NULL AS stopping
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, :kind, :data, :now FROM op
)
SELECT last_seq, stopping, {_NOTIFY_EVENT} FROM op""",
    **_OWNED_TYPES, outlives_stop=BOOL, kind=TEXT, data=TEXT,
)  # fmt: skip


def _boundary(go_on: str, kind: str) -> PgSql:
    """Checkpoint step :step and, unless a stop is recorded, go on (`go_on`: what else the
    operation's UPDATE sets; `kind`: the event of going on): one seq for step_completed, a
    second for going on only when no stop is recorded (the stop wins at the boundary)."""
    began = (
        """began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, :next_step, 1, :runner, :now FROM op WHERE go
), """
        if kind == "step_started"
        else ""
    )
    return PgSql(
        f"""
WITH op AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
    steps_completed = :next_step, agent_state_json = :state, updated_at = :now{go_on}
  WHERE {_OWNED}
  RETURNING last_seq, stop_requested_at IS NULL AS go
), {_finish_attempt("completed", ":output")}, {began}written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN go THEN 1 ELSE 0 END, 'step_completed', :data, :now FROM op
  UNION ALL
  SELECT :id, last_seq, '{kind}', :data2, :now FROM op WHERE go
)
SELECT last_seq, go, {_NOTIFY_EVENT} FROM op""",
        **_OWNED_TYPES, step=INT, next_step=INT, state=TEXT, output=TEXT, data=TEXT, data2=TEXT,
    )  # fmt: skip


# Checkpoint a step that was not the last and begin the next (its first attempt: only the runner
# that completed the step before it, this one under the fencing condition, can begin it).
_ADVANCE = _boundary("", "step_started")
# Checkpoint the last step and complete the operation, unless a stop was recorded first.
_COMPLETE = _boundary(
    """,
    status = CASE WHEN stop_requested_at IS NULL THEN 'COMPLETED' ELSE status END,
    result_json = CASE WHEN stop_requested_at IS NULL THEN :output ELSE result_json END,
    finished_at = CASE WHEN stop_requested_at IS NULL THEN :now ELSE finished_at END""",
    "completed",
)

# The event's data is built here, where the stored stop time is: halt_ms as halt_ms() computes
# it, from the later of the stored stop time and :seen (whole microseconds, so three decimals are
# exact).
_HALT = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
    status = 'INTERRUPTED', finished_at = :now,
    agent_state_json = coalesce(:state, agent_state_json)
  WHERE {_OWNED}
  RETURNING last_seq,
    '{{"mid_step":' || CASE WHEN :mid_step THEN 'true' ELSE 'false' END || ',"step":' || :step
    || ',"halt_ms":' || coalesce(round(
      greatest(0, extract(epoch FROM :now - greatest(stop_requested_at, :seen)) * 1000), 3), 0)
    || coalesce(',"cause":"' || stop_cause || '"', '') || '}}' AS data
), {_finish_attempt("interrupted", when=":mid_step")}, written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'interrupted', data, :now FROM op
)
SELECT last_seq, data, {_NOTIFY_EVENT} FROM op""",
    **_OWNED_TYPES, step=INT, mid_step=BOOL, seen=TIME, state=TEXT,
)  # fmt: skip

_FAIL = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
    status = 'FAILED', error = :error, finished_at = :now
  WHERE {_OWNED}
  RETURNING last_seq
), {_finish_attempt("failed")}, written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'failed', :data, :now FROM op
)
SELECT last_seq, {_NOTIFY_EVENT} FROM op""",
    **_OWNED_TYPES, step=INT, error=TEXT, data=TEXT,
)  # fmt: skip


class PostgresStorage(WaitingStorage):
    # The rows are locked in id order first, as the batcher does (pg_batch), so that a renewal
    # and a batch of step writes never wait for each other in a cycle (PostgreSQL would break
    # such a deadlock only after a second).
    _RENEW_LEASES = Sql("""
UPDATE operations SET lease_expires_at = :until
WHERE id IN (
    SELECT id FROM operations
    WHERE id = ANY(:ids) AND runner_id = :runner AND status = 'RUNNING'
    ORDER BY id FOR UPDATE)
  AND runner_id = :runner AND status = 'RUNNING'
RETURNING id, stop_requested_at IS NOT NULL OR pause_requested_at IS NOT NULL""")

    def _not_among(self, ids: list[str]) -> tuple[ColumnElement[bool] | TextClause, ...]:
        if not ids:
            return ()
        return (text("NOT (operations.id = ANY(:not_among))").bindparams(not_among=ids),)

    def __init__(
        self, db: Database, database_url: str, meters: StorageMetrics | None = None
    ) -> None:
        super().__init__(db, Cursors(db.engine, "pyformat"), meters)
        self.batcher = PostgresBatcher(
            libpq_url(database_url), observe=self.meters.batch(POSTGRES_BATCH)
        )
        self._batch_took = self.meters.write_path["batch"]
        self._time = self.cursors.to_db

    async def close(self) -> None:
        await self.batcher.close()
        await super().close()

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

    async def _run(self, sql: PgSql, params: dict[str, Any], read: Callable[[Any], T]) -> T:
        sql.check(params)
        began = time.monotonic()
        try:
            with translated(self._unavailable):
                result: T = await self.batcher.run(Statement(sql, params, read))
        finally:
            self._batch_took.observe(time.monotonic() - began)
        return result

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
    ) -> Created:
        labels = dict(labels or {})
        fingerprint = request_hash(agent, input_value, labels)
        while True:
            now = utcnow()
            held_until = now + timedelta(seconds=hold_seconds) if hold_seconds else None
            data: dict[str, JSONValue] = {"agent": agent}
            params = {
                "id": str(uuid.uuid4()),
                "agent": agent,
                "input": dump_json(input_value),
                "hash": fingerprint,
                "key": idempotency_key,
                "owner": owner,
                "labels": dump_json(labels) if labels else None,
                "held_until": None if held_until is None else self._time(held_until),
                "held_if_stopped": self._time(stopped_ahead_hold(now, held_until)),
                "now": self._time(now),
                "deadline_at": deadline_at(now, deadline_seconds, self._time),
                "max_steps": max_steps,
                "trace_parent": trace_parent,
                "data": dump_json(data),
                "announce": announce,
            }

            made = await self._run(_CREATE, params, partial(self._created, now, data))
            if made is not None:
                if idempotency_key is None:
                    return made
                # After the commit (Created.tombstone): the look in the statement (which
                # held the operation) misses a stop by key committed while it ran (READ
                # COMMITTED).
                tombstone = await self.take_tombstone(owner, idempotency_key)
                return replace(made, tombstone=tombstone)
            # The owner's key is taken: the twin, or the conflict. (Not found: the twin's
            # transaction rolled back after ours saw it, so the key is free again.)
            assert idempotency_key is not None
            row = await self._call(self.cursors.find_by_key, owner, idempotency_key)
            twin = twin_of(row, idempotency_key, fingerprint)
            if twin is not None:
                return Created(twin, created=False, events=())

    def _created(self, now: datetime, data: dict[str, JSONValue], row: Any) -> Created | None:
        if row is None:
            return None
        operation = self.cursors.operation(row)
        created = Event(operation.id, 1, EventKind.CREATED, data, now)
        return Created(operation, created=True, events=(created,))

    async def release(self, operation_id: str, announce: bool = True) -> Operation | None:
        def read(row: Any) -> Operation | None:
            return None if row is None else self.cursors.operation(row)

        return await self._run(_RELEASE, {"id": operation_id, "announce": announce}, read)

    async def record_stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
    ) -> InterruptResult | None:
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

        recorded = await self._run(_RECORD_STOP, params, read)
        if recorded is not None:
            return recorded
        # Nothing recorded: say why.
        operation = await self.get(operation_id)
        if operation is None:
            return None
        if operation.stop is not None:
            return InterruptResult(InterruptOutcome.ALREADY_REQUESTED, operation)
        return InterruptResult(InterruptOutcome.ALREADY_FINISHED, operation)

    # ------------------------------------------------------------------ the runner's writes

    async def claim_and_start(
        self, operation_id: str, runner_id: str, lease_seconds: float
    ) -> tuple[Claimed, Event] | None:
        now = utcnow()
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "lease": self._time(now + timedelta(seconds=lease_seconds)),
        }

        def read(row: Any) -> tuple[Claimed, Event] | None:
            if row is None:
                return None
            operation = self.cursors.operation(row)
            attempt, step, seq = row[len(COLUMNS)], operation.steps_completed, operation.last_seq
            claimed: dict[str, JSONValue] = {"from_step": step, "resumed": False}
            started: dict[str, JSONValue] = {"step": step, "attempt": attempt}
            return (
                Claimed(operation, Event(operation_id, seq - 1, EventKind.STARTED, claimed, now)),
                Event(operation_id, seq, EventKind.STEP_STARTED, started, now),
            )

        return await self._run(_CLAIM_AND_START, params, read)

    async def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            data: dict[str, JSONValue] = {"step": step, "attempt": row[1]}
            return Event(operation_id, row[0], EventKind.STEP_STARTED, data, now)

        return await self._run(_START_STEP, params, read)

    async def append(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> Appended | None:
        now = utcnow()
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "outlives_stop": outlives_stop,
            "kind": kind.value,
            "data": dump_json(data),
        }

        def read(row: Any) -> Appended | None:
            if row is None:
                return None
            return Appended(Event(operation_id, row[0], kind, data, now), stopping=row[1])

        return await self._run(_APPEND, params, read)

    async def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        started: dict[str, JSONValue] = {"step": step + 1, "attempt": 1}
        return await self._boundary(
            _ADVANCE, EventKind.STEP_STARTED, started, operation_id, step, output, state, runner_id
        )

    async def complete(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        done: dict[str, JSONValue] = {"result": output}
        return await self._boundary(
            _COMPLETE, EventKind.COMPLETED, done, operation_id, step, output, state, runner_id
        )

    async def _boundary(
        self,
        sql: PgSql,
        then: EventKind,
        then_data: dict[str, JSONValue],
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        runner_id: str,
    ) -> list[Event]:
        now = utcnow()
        completed: dict[str, JSONValue] = {"step": step, "output": output}
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "step": step,
            "next_step": step + 1,
            "state": dump_json(state),
            "output": dump_json(output),
            "data": dump_json(completed),
            "data2": dump_json(then_data),
        }

        def read(row: Any) -> list[Event]:
            if row is None:
                return []
            last_seq, go_on = row[0], row[1]
            if not go_on:
                return [Event(operation_id, last_seq, EventKind.STEP_COMPLETED, completed, now)]
            return [
                Event(operation_id, last_seq - 1, EventKind.STEP_COMPLETED, completed, now),
                Event(operation_id, last_seq, then, then_data, now),
            ]

        return await self._run(sql, params, read)

    async def halt(
        self,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None = None,
        kept: KeptState | None = None,
    ) -> Event | None:
        now = utcnow()
        params = {
            "state": None if kept is None else dump_json(kept.state),
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "step": step,
            "mid_step": mid_step,
            "seen": None if seen_at is None else self._time(seen_at),
        }

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            return Event(operation_id, row[0], EventKind.INTERRUPTED, json.loads(row[1]), now)

        return await self._run(_HALT, params, read)

    async def fail(self, operation_id: str, step: int, error: str, runner_id: str) -> Event | None:
        now = utcnow()
        data: dict[str, JSONValue] = {"error": error, "step": step}
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "step": step,
            "error": error,
            "data": dump_json(data),
        }

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            return Event(operation_id, row[0], EventKind.FAILED, data, now)

        return await self._run(_FAIL, params, read)
