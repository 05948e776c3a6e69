"""The durable floor's storage: the least a stop must write before it is acknowledged, and
before its terminal event is shown, with no Stopline code (bench/durable_floor.py).

A stop that is acknowledged must survive a crash, and a terminal event that a client has seen
must not change after one; so any design pays, on the stop's path, one durable write before the
acknowledgment (the stop and its `stop_requested` event) and one before the terminal event (the
halt and its `interrupted` event). These are those two writes in the shape Stopline gives them,
on the same databases and settings, and nothing else: no leases, attempts, fencing, metrics or
notifications.

* SQLite: a file in WAL mode with `synchronous=NORMAL`, as the runtime opens its own; each write
  one transaction of two statements (bump the operation's last seq, insert the event), run on
  the event loop's thread, as the runtime runs a stop's writes when its database thread is idle.
* PostgreSQL: each write one statement (a data-modifying CTE) in autocommit, prepared, on one
  psycopg connection driven by the event loop, as the runtime sends a write that is alone.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any, Protocol

STOPPED = json.dumps({"requested_by": "floor", "reason": "bench", "cause": "OPERATOR"})
HALTED = json.dumps({"mid_step": True, "step": 0, "halt_ms": 0.5, "cause": "OPERATOR"})


class Store(Protocol):
    async def begin(self, operation_id: str) -> None:
        """The operation's row, RUNNING (before any timed call)."""

    async def stop(self, operation_id: str) -> None:
        """The stop's durable write: what its acknowledgment waits for."""

    async def halt(self, operation_id: str) -> None:
        """The halt's durable write: what the terminal event waits for."""

    async def close(self) -> None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat()


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, last_seq INTEGER NOT NULL,
    stop_requested_at TEXT, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    operation_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (operation_id, seq));
"""
SQLITE_STOP = (
    "UPDATE operations SET stop_requested_at = :now, last_seq = last_seq + 1, updated_at = :now "
    "WHERE id = :id AND status = 'RUNNING' AND stop_requested_at IS NULL RETURNING last_seq"
)
SQLITE_HALT = (
    "UPDATE operations SET status = 'INTERRUPTED', last_seq = last_seq + 1, updated_at = :now "
    "WHERE id = :id AND status = 'RUNNING' RETURNING last_seq"
)
SQLITE_EVENT = (
    "INSERT INTO events (operation_id, seq, kind, data, created_at) "
    "VALUES (:id, :seq, :kind, :data, :now)"
)


class SqliteStore:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(SQLITE_SCHEMA)

    async def begin(self, operation_id: str) -> None:
        self._db.execute(
            "INSERT INTO operations (id, status, last_seq, updated_at) VALUES (?, 'RUNNING', 2, ?)",
            (operation_id, _now()),
        )

    def _write(self, bump: str, operation_id: str, kind: str, data: str) -> None:
        cursor = self._db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            params = {"id": operation_id, "now": _now()}
            row = cursor.execute(bump, params).fetchone()
            if row is None:
                raise RuntimeError(f"the floor's operation {operation_id} is not running")
            cursor.execute(SQLITE_EVENT, {**params, "seq": row[0], "kind": kind, "data": data})
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()

    async def stop(self, operation_id: str) -> None:
        self._write(SQLITE_STOP, operation_id, "stop_requested", STOPPED)

    async def halt(self, operation_id: str) -> None:
        self._write(SQLITE_HALT, operation_id, "interrupted", HALTED)

    async def close(self) -> None:
        self._db.close()


PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS operations (id TEXT PRIMARY KEY, status TEXT NOT NULL, "
    "last_seq INTEGER NOT NULL, stop_requested_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS events (operation_id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "kind TEXT NOT NULL, data JSONB NOT NULL, created_at TIMESTAMPTZ NOT NULL, "
    "PRIMARY KEY (operation_id, seq))",
)
PG_WRITE = """
WITH bumped AS (
    UPDATE operations SET {set}, last_seq = last_seq + 1, updated_at = now()
    WHERE id = %(id)s AND status = 'RUNNING'{unless} RETURNING id, last_seq)
INSERT INTO events (operation_id, seq, kind, data, created_at)
SELECT id, last_seq, %(kind)s, %(data)s::jsonb, now() FROM bumped RETURNING seq"""
PG_STOP = PG_WRITE.format(set="stop_requested_at = now()", unless=" AND stop_requested_at IS NULL")
PG_HALT = PG_WRITE.format(set="status = 'INTERRUPTED'", unless="")


class PostgresStore:
    def __init__(self, connection: Any) -> None:
        self._conn = connection

    @classmethod
    async def open(cls, conninfo: str) -> PostgresStore:
        import psycopg

        connection = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        for statement in PG_SCHEMA:
            await connection.execute(statement)
        return cls(connection)

    async def begin(self, operation_id: str) -> None:
        await self._conn.execute(
            "INSERT INTO operations (id, status, last_seq, updated_at) "
            "VALUES (%s, 'RUNNING', 2, now())",
            (operation_id,),
        )

    async def _write(self, sql: str, operation_id: str, kind: str, data: str) -> None:
        params = {"id": operation_id, "kind": kind, "data": data}
        cursor = await self._conn.execute(sql, params, prepare=True)
        if await cursor.fetchone() is None:
            raise RuntimeError(f"the floor's operation {operation_id} is not running")

    async def stop(self, operation_id: str) -> None:
        await self._write(PG_STOP, operation_id, "stop_requested", STOPPED)

    async def halt(self, operation_id: str) -> None:
        await self._write(PG_HALT, operation_id, "interrupted", HALTED)

    async def close(self) -> None:
        await self._conn.close()


async def open_store(url: str) -> Store:
    """`sqlite:///PATH` or a PostgreSQL conninfo URL (`postgresql://...`)."""
    if url.startswith("sqlite:///"):
        return SqliteStore(url.removeprefix("sqlite:///"))
    return await PostgresStore.open(url)
