"""Storage on SQLite: each write as fixed SQL, several statements in one transaction, run inline
on the event loop when nothing else is queued, group-committed on the database thread otherwise.

Why both: a SQLite write of the runner takes about a tenth of a millisecond, while handing it to
the database thread and back costs about as much again, plus the wake-up of a core when the
machine is otherwise idle; and with many operations running the queue is rarely empty, so
committing everything queued in one transaction removes most of the cost of a transaction.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, TextClause, text
from sqlalchemy.exc import IntegrityError

from runtime_service.database import Database
from runtime_service.domain import (
    Event,
    EventKind,
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    StopCause,
)
from runtime_service.metrics import SQLITE_GROUP_COMMIT, StorageMetrics
from runtime_service.rows import operation_from_row
from runtime_service.storage.cursors import Cursors
from runtime_service.storage.errors import translated
from runtime_service.storage.interface import (
    Appended,
    Claimed,
    Created,
    KeptState,
    halt_data,
    halt_ms,
    request_hash,
    stop_data,
    stopped_ahead_hold,
    utcnow,
)
from runtime_service.storage.interface import (
    deadline_at as _deadline_at,
)
from runtime_service.storage.shared import twin_of
from runtime_service.storage.sql import Sql
from runtime_service.storage.sqlite_commit import GroupCommit, InlineWriter, WouldBlock, Write
from runtime_service.storage.waiting import WaitingStorage
from stopline.json_values import dump_json

T = TypeVar("T")

# Owned by this runner and still running: the fencing condition of every runner write.
_OWNED = "id = :id AND status = 'RUNNING' AND runner_id = :runner"

# Held (`:held_if_stopped`, see stopped_ahead_hold) when a live stop by its key is already
# committed, so no runner claims it before the start applies that stop.
_CREATE = Sql("""
INSERT INTO operations (id, agent, input_json, request_hash, idempotency_key, owner, labels_json,
  status, steps_completed, last_seq, held_until, created_at, updated_at, deadline_at, max_steps,
  trace_parent)
VALUES (:id, :agent, :input, :hash, :key, :owner, :labels, 'PENDING', 0, 1,
  CASE WHEN EXISTS (SELECT 1 FROM stop_tombstones
    WHERE owner = :owner AND idempotency_key = :key AND expires_at > :now)
  THEN :held_if_stopped ELSE :held_until END,
  :now, :now, :deadline_at, :max_steps, :trace_parent)
RETURNING *""")

_RELEASE = Sql("""
UPDATE operations SET held_until = NULL
WHERE id = :id AND status = 'PENDING' AND held_until IS NOT NULL
RETURNING *""")

# The stop intent, recorded once, on an operation that has not ended. One that is not RUNNING
# (PENDING, WAITING, PAUSED: no step in flight) is interrupted in the same UPDATE (SET sees the
# old row: `status` there is the one before).
_RECORD_STOP = Sql("""
UPDATE operations SET
  last_seq = last_seq + CASE WHEN status <> 'RUNNING' THEN 2 ELSE 1 END,
  updated_at = :now, stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason,
  stop_cause = :cause,
  status = CASE WHEN status <> 'RUNNING' THEN 'INTERRUPTED' ELSE status END,
  finished_at = CASE WHEN status <> 'RUNNING' THEN :now ELSE finished_at END
WHERE id = :id AND status IN ('PENDING', 'RUNNING', 'WAITING', 'PAUSED')
  AND stop_requested_at IS NULL
RETURNING *""")

# A PENDING operation never has a stop recorded (recording one interrupts it), so the claim is
# always followed by its first step.
_CLAIM = Sql("""
UPDATE operations SET status = 'RUNNING', runner_id = :runner, lease_expires_at = :lease,
  held_until = NULL, last_seq = last_seq + 2, updated_at = :now
WHERE id = :id AND status = 'PENDING' AND (held_until IS NULL OR held_until <= :now)
RETURNING *""")

_NEXT_ATTEMPT = Sql("SELECT count(*) + 1 FROM steps WHERE operation_id = :id AND step = :step")

_BUMP_TO_START = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
WHERE {_OWNED} AND stop_requested_at IS NULL
RETURNING last_seq""")

# An event of the step in flight (every kind: output, deltas, agent events, tool call records).
# Output is stored only while no stop is recorded, so once a stop_requested event is stored no
# output follows it, only the halt. `:outlives_stop` lifts that for records allowed between the
# stop and the halt (settling tool calls, deltas passed before the stop reached the step) and
# for the stop-at-boundary mode, where the step in flight runs to its end and its output is kept.
_BUMP_TO_APPEND = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
WHERE {_OWNED} AND (stop_requested_at IS NULL OR :outlives_stop)
RETURNING last_seq, stop_requested_at""")

# Checkpoint step N and, unless a stop is recorded, begin step N+1: one seq for step_completed,
# a second for step_started only when no stop is recorded (the stop wins at the boundary).
_BUMP_TO_ADVANCE = Sql(f"""
UPDATE operations SET
  last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
  steps_completed = :next_step, agent_state_json = :state, updated_at = :now
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at""")

# The last step: checkpoint it and complete the operation, unless a stop was recorded first
# (then only the checkpoint: the stop wins, and the runner halts at this boundary).
_BUMP_TO_COMPLETE = Sql(f"""
UPDATE operations SET
  last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
  steps_completed = :next_step, agent_state_json = :state, updated_at = :now,
  status = CASE WHEN stop_requested_at IS NULL THEN 'COMPLETED' ELSE status END,
  result_json = CASE WHEN stop_requested_at IS NULL THEN :output ELSE result_json END,
  finished_at = CASE WHEN stop_requested_at IS NULL THEN :now ELSE finished_at END
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at""")

# `:state`: the state the cut step kept for a stop (NULL: the last checkpoint's stays).
_HALT = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  status = 'INTERRUPTED', finished_at = :now,
  agent_state_json = coalesce(:state, agent_state_json)
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at, stop_cause""")

_FAIL = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  status = 'FAILED', error = :error, finished_at = :now
WHERE {_OWNED}
RETURNING last_seq""")

_EVENT = Sql("""
INSERT INTO events (operation_id, seq, kind, data_json, created_at)
VALUES (:id, :seq, :kind, :data, :now)""")

_TWO_EVENTS = Sql("""
INSERT INTO events (operation_id, seq, kind, data_json, created_at)
VALUES (:id, :seq, :kind, :data, :now), (:id, :seq + 1, :kind2, :data2, :now)""")

_ATTEMPT = Sql("""
INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
VALUES (:id, :step, :attempt, :runner, :now)""")

# Only the newest attempt is this runner's (older ones were settled as abandoned at takeover).
_FINISH_ATTEMPT = Sql("""
UPDATE steps SET finished_at = :now, outcome = :outcome, output_json = :output
WHERE operation_id = :id AND step = :step AND finished_at IS NULL
  AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)""")


class SqliteStorage(WaitingStorage):
    # The ids as one JSON array (SQLite has no array type; json_each reads it as rows).
    _RENEW_LEASES = Sql("""
UPDATE operations SET lease_expires_at = :until
WHERE id IN (SELECT value FROM json_each(:ids)) AND runner_id = :runner AND status = 'RUNNING'
RETURNING id, stop_requested_at IS NOT NULL OR pause_requested_at IS NOT NULL""")

    def _lease_ids(self, operation_ids: list[str]) -> Any:
        return json.dumps(operation_ids)

    def _not_among(self, ids: list[str]) -> tuple[ColumnElement[bool] | TextClause, ...]:
        if not ids:
            return ()
        among = text("operations.id NOT IN (SELECT value FROM json_each(:not_among))")
        return (among.bindparams(not_among=json.dumps(ids)),)

    def __init__(self, db: Database, meters: StorageMetrics | None = None) -> None:
        super().__init__(db, Cursors(db.engine, "named"), meters)
        self._inline = InlineWriter(db.engine.url.database, self.cursors.dbapi)
        self._group = GroupCommit(
            db, self._together, observe=self.meters.batch(SQLITE_GROUP_COMMIT)
        )
        self._inline_took = self.meters.write_path["inline"]
        self._group_took = self.meters.write_path["group_commit"]
        self._time = self.cursors.to_db

    async def close(self) -> None:
        self._inline.close()
        await super().close()

    @asynccontextmanager
    async def retention_turn(self) -> AsyncIterator[bool]:
        """Always this replica's: a SQLite database serves one runtime process."""
        yield True

    # ------------------------------------------------------------------ how writes run

    async def _write(self, write: Write, *args: Any) -> Any:
        """A runner write: inline here when nothing else is queued for the database thread,
        else group-committed with whatever is (see GroupCommit)."""
        began = time.monotonic()
        with translated(self._unavailable):
            if self._group.idle and self._inline.possible:
                try:
                    result = self._inline.run(write, *args)
                except WouldBlock:
                    pass
                else:
                    self._inline_took.observe(time.monotonic() - began)
                    return result
            try:
                return await self._group.run(write, args)
            finally:
                self._group_took.observe(time.monotonic() - began)

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
    ) -> Created:
        fingerprint = request_hash(agent, input_value, dict(labels or {}))
        fields = (agent, input_value, idempotency_key, dict(labels or {}), hold_seconds, owner)
        limits = (deadline_seconds, max_steps)
        return await self._call(self._create, fingerprint, *fields, *limits, trace_parent)

    def _create(
        self,
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
    ) -> Created:
        if key is not None:
            twin = self._twin(owner, key, fingerprint)
            if twin is not None:
                return Created(twin, created=False, events=())
        now = utcnow()
        held_until = now + timedelta(seconds=hold_seconds) if hold_seconds else None
        params = {
            "id": str(uuid.uuid4()),
            "agent": agent,
            "input": dump_json(input_value),
            "hash": fingerprint,
            "key": key,
            "owner": owner,
            "labels": dump_json(labels) if labels else None,
            "held_until": None if held_until is None else self._time(held_until),
            "held_if_stopped": self._time(stopped_ahead_hold(now, held_until)),
            "now": self._time(now),
            "deadline_at": _deadline_at(now, deadline_seconds, self._time),
            "max_steps": max_steps,
            "trace_parent": trace_parent,
        }
        try:
            with self.cursors.transaction() as cur:
                cur.execute(_CREATE.text, params)
                operation = operation_from_row(self.cursors.row(cur))
                event = self._event(cur, operation.id, 1, EventKind.CREATED, {"agent": agent}, now)
        except IntegrityError:
            # Lost a race with a concurrent start using the same key: return the winner.
            twin = None if key is None else self._twin(owner, key, fingerprint)
            if twin is None:
                raise
            return Created(twin, created=False, events=())
        # After the commit (Created.tombstone), on the same trip to the database thread. The
        # stop is applied on a later trip, and other writes (a runner's claims among them) run
        # in between: the create's hold is what keeps the claims off the operation.
        tombstone = None if key is None else self._take_tombstone(owner, key)
        return Created(operation, created=True, events=(event,), tombstone=tombstone)

    def _twin(self, owner: str, key: str, fingerprint: str) -> Operation | None:
        return twin_of(self.cursors.find_by_key(owner, key), key, fingerprint)

    async def release(self, operation_id: str, announce: bool = True) -> Operation | None:
        return await self._call(self._release, operation_id)

    def _release(self, operation_id: str) -> Operation | None:
        with self.cursors.transaction() as cur:
            cur.execute(_RELEASE.text, {"id": operation_id})
            row = self.cursors.row(cur)
        return None if row is None else operation_from_row(row)

    async def record_stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
    ) -> InterruptResult | None:
        # A runner write's path (inline when the database thread is idle): the stop is on the
        # path every client waits on, and a hop to the database thread and back costs about
        # as much as the write itself.
        result: InterruptResult | None = await self._write(
            self._record_stop, operation_id, requested_by, reason, cause
        )
        return result

    def _record_stop(
        self, cur: Any, operation_id: str, requested_by: str, reason: str, cause: StopCause
    ) -> InterruptResult | None:
        now = utcnow()
        params = {
            "id": operation_id,
            "now": self._time(now),
            "by": requested_by,
            "reason": reason,
            "cause": cause.value,
        }
        cur.execute(_RECORD_STOP.text, params)
        row = self.cursors.row(cur)
        if row is None:
            operation = self.cursors.get_in(cur, operation_id)
            if operation is None:
                return None
            if operation.stop is not None:
                return InterruptResult(InterruptOutcome.ALREADY_REQUESTED, operation)
            return InterruptResult(InterruptOutcome.ALREADY_FINISHED, operation)
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

    # ------------------------------------------------------------------ the runner's writes

    async def claim_and_start(
        self, operation_id: str, runner_id: str, lease_seconds: float
    ) -> tuple[Claimed, Event] | None:
        now = utcnow()
        lease = self._time(now + timedelta(seconds=lease_seconds))
        result: tuple[Claimed, Event] | None = await self._write(
            self._claim_and_start, operation_id, runner_id, lease, now
        )
        return result

    def _claim_and_start(
        self, cur: Any, operation_id: str, runner_id: str, lease: Any, now: datetime
    ) -> tuple[Claimed, Event] | None:
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "lease": lease}
        cur.execute(_CLAIM.text, params)
        row = self.cursors.row(cur)
        if row is None:
            return None
        operation = operation_from_row(row)
        step, seq = operation.steps_completed, operation.last_seq
        cur.execute(_NEXT_ATTEMPT.text, {"id": operation_id, "step": step})
        attempt = cur.fetchone()[0]
        claimed: dict[str, JSONValue] = {"from_step": step, "resumed": False}
        started: dict[str, JSONValue] = {"step": step, "attempt": attempt}
        first, begun = self._pair(
            cur, operation_id, seq - 1, now, STARTED, claimed, STEP_STARTED, started
        )
        cur.execute(_ATTEMPT.text, {**params, "step": step, "attempt": attempt})
        return Claimed(operation, first), begun

    async def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        result: Event | None = await self._write(self._start_step, operation_id, step, runner_id)
        return result

    def _start_step(self, cur: Any, operation_id: str, step: int, runner_id: str) -> Event | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}
        cur.execute(_NEXT_ATTEMPT.text, params)
        attempt = cur.fetchone()[0]
        cur.execute(_BUMP_TO_START.text, params)
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute(_ATTEMPT.text, {**params, "attempt": attempt})
        data: dict[str, JSONValue] = {"step": step, "attempt": attempt}
        return self._event(cur, operation_id, row[0], STEP_STARTED, data, now)

    async def append(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> Appended | None:
        result: Appended | None = await self._write(
            self._append_event, operation_id, kind, data, runner_id, outlives_stop
        )
        return result

    def _append_event(
        self,
        cur: Any,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives: bool,
    ) -> Appended | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now)}
        cur.execute(_BUMP_TO_APPEND.text, {**params, "outlives_stop": outlives})
        row = cur.fetchone()
        if row is None:
            return None
        event = self._event(cur, operation_id, row[0], kind, data, now)
        return Appended(event, stopping=row[1] is not None)

    async def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        written: list[Event] = await self._write(
            self._boundary, _BUMP_TO_ADVANCE, operation_id, step, output, state, runner_id
        )
        return written

    async def complete(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        written: list[Event] = await self._write(
            self._boundary, _BUMP_TO_COMPLETE, operation_id, step, output, state, runner_id
        )
        return written

    def _boundary(
        self,
        cur: Any,
        bump: Sql,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        runner_id: str,
    ) -> list[Event]:
        """A step boundary: checkpoint `step` and, unless a stop is recorded, go on (begin the
        next step, or complete the operation after the last)."""
        now = utcnow()
        output_json = dump_json(output)
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "step": step,
            "next_step": step + 1,
            "state": dump_json(state),
            "output": output_json,
        }
        cur.execute(bump.text, params)
        row = cur.fetchone()
        if row is None:
            return []
        last_seq, go_on = row[0], row[1] is None
        self._finish_attempt(cur, params, "completed", output_json)
        completed: dict[str, JSONValue] = {"step": step, "output": output}
        if not go_on:
            return [self._event(cur, operation_id, last_seq, STEP_COMPLETED, completed, now)]
        if bump is _BUMP_TO_COMPLETE:
            done: dict[str, JSONValue] = {"result": output}
            return list(
                self._pair(
                    cur, operation_id, last_seq - 1, now, STEP_COMPLETED, completed, COMPLETED, done
                )
            )
        # Step + 1 was never begun before: only the runner that completed `step` (this one,
        # under the fencing condition) can begin it, so this is its first attempt.
        started: dict[str, JSONValue] = {"step": step + 1, "attempt": 1}
        cur.execute(_ATTEMPT.text, {**params, "step": step + 1, "attempt": 1})
        pair = self._pair(
            cur, operation_id, last_seq - 1, now, STEP_COMPLETED, completed, STEP_STARTED, started
        )
        return list(pair)

    async def halt(
        self,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None = None,
        kept: KeptState | None = None,
    ) -> Event | None:
        state = None if kept is None else dump_json(kept.state)
        result: Event | None = await self._write(
            self._halt, operation_id, step, mid_step, runner_id, seen_at, state
        )
        return result

    def _halt(
        self,
        cur: Any,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None,
        state: str | None,
    ) -> Event | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}
        cur.execute(_HALT.text, {**params, "state": state})
        row = cur.fetchone()
        if row is None:
            return None
        if mid_step:
            self._finish_attempt(cur, params, "interrupted", None)
        since = self.cursors.from_db(row[1])
        data = halt_data(
            mid_step, step, halt_ms(now, since, seen_at), StopCause(row[2]) if row[2] else None
        )
        return self._event(cur, operation_id, row[0], INTERRUPTED, data, now)

    async def fail(self, operation_id: str, step: int, error: str, runner_id: str) -> Event | None:
        result: Event | None = await self._write(self._fail, operation_id, step, error, runner_id)
        return result

    def _fail(
        self, cur: Any, operation_id: str, step: int, error: str, runner_id: str
    ) -> Event | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}
        cur.execute(_FAIL.text, {**params, "error": error})
        row = cur.fetchone()
        if row is None:
            return None  # the attempt is ours to settle only while the operation is
        self._finish_attempt(cur, params, "failed", None)
        data: dict[str, JSONValue] = {"error": error, "step": step}
        return self._event(cur, operation_id, row[0], EventKind.FAILED, data, now)

    # ------------------------------------------------------------------ pieces of writes

    @staticmethod
    def _finish_attempt(
        cur: Any, params: dict[str, Any], outcome: str, output_json: str | None
    ) -> None:
        cur.execute(_FINISH_ATTEMPT.text, {**params, "outcome": outcome, "output": output_json})

    def _event(
        self,
        cur: Any,
        operation_id: str,
        seq: int,
        kind: EventKind,
        data: dict[str, JSONValue],
        now: datetime,
    ) -> Event:
        params = {
            "id": operation_id,
            "seq": seq,
            "kind": kind.value,
            "data": dump_json(data),
            "now": self._time(now),
        }
        cur.execute(_EVENT.text, params)
        return Event(operation_id, seq, kind, data, now)

    def _pair(
        self,
        cur: Any,
        operation_id: str,
        seq: int,
        now: datetime,
        kind: EventKind,
        data: dict[str, JSONValue],
        kind2: EventKind,
        data2: dict[str, JSONValue],
    ) -> tuple[Event, Event]:
        """Two events, seq and seq + 1, in one statement."""
        params = {
            "id": operation_id,
            "seq": seq,
            "kind": kind.value,
            "data": dump_json(data),
            "kind2": kind2.value,
            "data2": dump_json(data2),
            "now": self._time(now),
        }
        cur.execute(_TWO_EVENTS.text, params)
        return (
            Event(operation_id, seq, kind, data, now),
            Event(operation_id, seq + 1, kind2, data2, now),
        )


STARTED = EventKind.STARTED
STEP_STARTED = EventKind.STEP_STARTED
STEP_COMPLETED = EventKind.STEP_COMPLETED
COMPLETED = EventKind.COMPLETED
STOP_REQUESTED = EventKind.STOP_REQUESTED
INTERRUPTED = EventKind.INTERRUPTED
