"""The runner's writes on SQLite (claim and start, each step, its events, the boundary, the halt,
the failure), each a method that runs several fixed statements (sqlite_sql.py) on one cursor;
SqliteStorage runs them inline or group-committed (its `_write`), and its stop writes its events
with the same pieces.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from runtime_service.domain import Event, EventKind, JSONValue, StopCause
from runtime_service.rows import operation_from_row
from runtime_service.storage.interface import Appended, Claimed, KeptState
from runtime_service.storage.records import halt_data, halt_ms, utcnow
from runtime_service.storage.shared import SharedStorage
from runtime_service.storage.sql import Sql
from runtime_service.storage.sqlite_commit import Write
from runtime_service.storage.sqlite_sql import (
    ATTEMPT,
    BUMP_TO_ADVANCE,
    BUMP_TO_APPEND,
    BUMP_TO_COMPLETE,
    BUMP_TO_START,
    CLAIM,
    EVENT,
    FAIL,
    FINISH_ATTEMPT,
    HALT,
    NEXT_ATTEMPT,
    RELEASE_AND_CLAIM,
    TWO_EVENTS,
)
from stopline.json_values import dump_json

STARTED = EventKind.STARTED
STEP_STARTED = EventKind.STEP_STARTED
STEP_COMPLETED = EventKind.STEP_COMPLETED
COMPLETED = EventKind.COMPLETED
STOP_REQUESTED = EventKind.STOP_REQUESTED
INTERRUPTED = EventKind.INTERRUPTED


def completed_text(step: int, output_json: str) -> str:
    """`dump_json({"step": step, "output": output})` from the output's JSON, which the boundary
    has made already for the checkpoint: the same text (compact, keys in this order) for one
    encoding less per step. tests/test_write_path.py holds the three equal to dump_json."""
    return f'{{"step":{step},"output":{output_json}}}'


def result_text(output_json: str) -> str:
    """`dump_json({"result": output})`, likewise."""
    return f'{{"result":{output_json}}}'


def started_text(step: int, attempt: int) -> str:
    """`dump_json({"step": step, "attempt": attempt})`, likewise."""
    return f'{{"step":{step},"attempt":{attempt}}}'


class SqliteStepWrites(SharedStorage):
    """Composed into SqliteStorage, which gives it `_write` and `_time`."""

    _time: Any  # the cursors' datetime conversion (Cursors.to_db)

    async def _write(self, write: Write, *args: Any) -> Any:
        return await self._write_soon(write, *args)

    async def _write_first(self, write: Write, *args: Any) -> Any:
        """A stop's write: when it cannot run inline, ahead of the queue (batching.py)."""
        return await self._write_soon(write, *args, urgent=True)

    def _write_soon(self, write: Write, *args: Any, urgent: bool = False) -> asyncio.Future[Any]:
        raise NotImplementedError  # SqliteStorage: inline, or group-committed

    async def claim_and_start(
        self, operation_id: str, runner_id: str, lease_seconds: float, release: bool = False
    ) -> tuple[Claimed, Event] | None:
        now = utcnow()
        lease = self._time(now + timedelta(seconds=lease_seconds))
        result: tuple[Claimed, Event] | None = await self._write(
            self._claim_and_start, operation_id, runner_id, lease, now, release
        )
        return result

    def _claim_and_start(
        self,
        cur: Any,
        operation_id: str,
        runner_id: str,
        lease: Any,
        now: datetime,
        release: bool = False,
    ) -> tuple[Claimed, Event] | None:
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "lease": lease}
        cur.execute((RELEASE_AND_CLAIM if release else CLAIM).text, params)
        row = self.cursors.row(cur)
        if row is None:
            return None
        operation = operation_from_row(row)
        step, seq = operation.steps_completed, operation.last_seq
        cur.execute(NEXT_ATTEMPT.text, {"id": operation_id, "step": step})
        attempt = cur.fetchone()[0]
        claimed: dict[str, JSONValue] = {"from_step": step, "resumed": False}
        started: dict[str, JSONValue] = {"step": step, "attempt": attempt}
        first, begun = self._pair(
            cur, operation_id, seq - 1, now, STARTED, claimed, STEP_STARTED, started
        )
        cur.execute(ATTEMPT.text, {**params, "step": step, "attempt": attempt})
        return Claimed(operation, first), begun

    async def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        result: Event | None = await self._write(self._start_step, operation_id, step, runner_id)
        return result

    def _start_step(self, cur: Any, operation_id: str, step: int, runner_id: str) -> Event | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}
        cur.execute(NEXT_ATTEMPT.text, params)
        attempt = cur.fetchone()[0]
        cur.execute(BUMP_TO_START.text, params)
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute(ATTEMPT.text, {**params, "attempt": attempt})
        data: dict[str, JSONValue] = {"step": step, "attempt": attempt}
        return self._event(cur, operation_id, row[0], STEP_STARTED, data, now)

    def append_soon(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> asyncio.Future[Appended | None]:
        future: asyncio.Future[Appended | None] = self._write_soon(
            self._append_event, operation_id, kind, data, runner_id, outlives_stop
        )
        return future

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
        at = self._time(now)
        params = {"id": operation_id, "runner": runner_id, "now": at, "outlives_stop": outlives}
        cur.execute(BUMP_TO_APPEND.text, params)
        row = cur.fetchone()
        if row is None:
            return None
        event = self._event(cur, operation_id, row[0], kind, data, now, at)
        return Appended(event, stopping=row[1] is not None)

    async def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        written: list[Event] = await self._write(
            self._boundary, BUMP_TO_ADVANCE, operation_id, step, output, state, runner_id
        )
        return written

    async def complete(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        written: list[Event] = await self._write(
            self._boundary, BUMP_TO_COMPLETE, operation_id, step, output, state, runner_id
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
        at = self._time(now)
        output_json = dump_json(output)
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": at,
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
        completed_json = completed_text(step, output_json)
        if not go_on:
            return [
                self._event(
                    cur, operation_id, last_seq, STEP_COMPLETED, completed, now, at, completed_json
                )
            ]
        if bump is BUMP_TO_COMPLETE:
            done: dict[str, JSONValue] = {"result": output}
            texts = (completed_json, result_text(output_json))
            ended = self._pair(
                cur, operation_id, last_seq - 1, now, STEP_COMPLETED, completed, COMPLETED,
                done, at, texts,
            )  # fmt: skip
            return list(ended)
        # Step + 1 was never begun before: only the runner that completed `step` (this one,
        # under the fencing condition) can begin it, so this is its first attempt.
        started: dict[str, JSONValue] = {"step": step + 1, "attempt": 1}
        cur.execute(ATTEMPT.text, {**params, "step": step + 1, "attempt": 1})
        texts = (completed_json, started_text(step + 1, 1))
        pair = self._pair(
            cur, operation_id, last_seq - 1, now, STEP_COMPLETED, completed, STEP_STARTED,
            started, at, texts,
        )  # fmt: skip
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
        result: Event | None = await self._write_first(
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
        cur.execute(HALT.text, {**params, "state": state})
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
        cur.execute(FAIL.text, {**params, "error": error})
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
        cur.execute(FINISH_ATTEMPT.text, {**params, "outcome": outcome, "output": output_json})

    def _event(
        self,
        cur: Any,
        operation_id: str,
        seq: int,
        kind: EventKind,
        data: dict[str, JSONValue],
        now: datetime,
        at: str | None = None,
        text: str | None = None,
    ) -> Event:
        """`at`: `now` as stored, when the write has it already; `text`: `data` as JSON,
        likewise (a step boundary builds it from the output's JSON)."""
        params = {
            "id": operation_id,
            "seq": seq,
            "kind": kind.value,
            "data": dump_json(data) if text is None else text,
            "now": self._time(now) if at is None else at,
        }
        cur.execute(EVENT.text, params)
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
        at: str | None = None,
        texts: tuple[str, str] | None = None,
    ) -> tuple[Event, Event]:
        """Two events, seq and seq + 1, in one statement (`at`, `texts`: as for `_event`)."""
        params = {
            "id": operation_id,
            "seq": seq,
            "kind": kind.value,
            "data": dump_json(data) if texts is None else texts[0],
            "kind2": kind2.value,
            "data2": dump_json(data2) if texts is None else texts[1],
            "now": self._time(now) if at is None else at,
        }
        cur.execute(TWO_EVENTS.text, params)
        return (
            Event(operation_id, seq, kind, data, now),
            Event(operation_id, seq + 1, kind2, data2, now),
        )
