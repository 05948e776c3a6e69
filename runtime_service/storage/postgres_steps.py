"""The runner's writes on PostgreSQL (claim and start, each step, its events, the boundary, the
halt, the failure): each one statement (postgres_sql.py) queued on its operation's batcher.
PostgresStorage gives them `_run_soon` and `_time`; its create queues a claim right behind its
own write (`_claim_and_start`), so both go out in one batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from runtime_service.domain import Event, EventKind, JSONValue
from runtime_service.storage.cursors import COLUMNS
from runtime_service.storage.interface import Appended, Claimed, KeptState
from runtime_service.storage.postgres_sql import (
    ADVANCE,
    APPEND,
    CLAIM_AND_START,
    COMPLETE,
    FAIL,
    HALT,
    RELEASE_AND_START,
    START_STEP,
)
from runtime_service.storage.records import utcnow
from runtime_service.storage.shared import SharedStorage
from runtime_service.storage.sql import PgSql
from stopline.json_values import dump_json

T = TypeVar("T")


class PostgresStepWrites(SharedStorage):
    """Composed into PostgresStorage, which gives it `_run_soon` and `_time`."""

    _time: Any  # the cursors' datetime conversion (Cursors.to_db)

    def _run_soon(
        self, sql: PgSql, params: dict[str, Any], read: Callable[[Any], T]
    ) -> asyncio.Future[T]:
        raise NotImplementedError  # PostgresStorage: on the operation's batcher

    async def _run(self, sql: PgSql, params: dict[str, Any], read: Callable[[Any], T]) -> T:
        return await self._run_soon(sql, params, read)

    async def claim_and_start(
        self, operation_id: str, runner_id: str, lease_seconds: float, release: bool = False
    ) -> tuple[Claimed, Event] | None:
        return await self._claim_and_start(
            operation_id, runner_id, lease_seconds, release, utcnow()
        )

    def _claim_and_start(
        self, operation_id: str, runner_id: str, lease_seconds: float, release: bool, now: datetime
    ) -> asyncio.Future[tuple[Claimed, Event] | None]:
        """The claim, queued now (see create, which queues it right behind its own write)."""
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

        return self._run_soon(RELEASE_AND_START if release else CLAIM_AND_START, params, read)

    async def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        now = utcnow()
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            data: dict[str, JSONValue] = {"step": step, "attempt": row[1]}
            return Event(operation_id, row[0], EventKind.STEP_STARTED, data, now)

        return await self._run(START_STEP, params, read)

    def append_soon(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> asyncio.Future[Appended | None]:
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

        return self._run_soon(APPEND, params, read)

    async def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        started: dict[str, JSONValue] = {"step": step + 1, "attempt": 1}
        return await self._boundary(
            ADVANCE, EventKind.STEP_STARTED, started, operation_id, step, output, state, runner_id
        )

    async def complete(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        done: dict[str, JSONValue] = {"result": output}
        return await self._boundary(
            COMPLETE, EventKind.COMPLETED, done, operation_id, step, output, state, runner_id
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

        return await self._run(HALT, params, read)

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

        return await self._run(FAIL, params, read)
