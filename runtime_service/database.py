"""Engine construction and the thread that runs blocking database work off the event loop.

Storage's blocking work (SQLAlchemy Core and DBAPI cursors, easy to reason about transactions)
reaches the event loop through Database.call, which runs it in a worker thread. SQLite gets
a single worker, so writes never contend for its one write lock inside a process; other backends
get a small pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError

P = ParamSpec("P")
T = TypeVar("T")


def create_db_engine(url: str, busy_timeout_seconds: float = 10.0) -> Engine:
    """An engine for `url`; SQLite files get WAL, a busy timeout and real transactions.

    The busy timeout bounds how long a write waits for a lock held by another process (a backup,
    an admin shell) before it fails and the call answers UNAVAILABLE. SQLite gets one database
    thread, so every call queued behind that write waits too: a long timeout looks like a hang."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping replaces connections that died with a database restart; connect_timeout makes
        # an unreachable server an error in seconds (answered UNAVAILABLE), not a hang.
        engine = create_engine(
            url, pool_size=8, max_overflow=8, connect_args={"connect_timeout": 5}
        )
        _ping_when_idle(engine)
        return engine

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    busy_ms = int(busy_timeout_seconds * 1000)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": busy_timeout_seconds}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide where transactions begin (pysqlite's own
        # handling defers BEGIN and would let a read-then-write race).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # The storage's Checkpointer folds the WAL back on a thread of its own; a writer
        # checkpoints only if the WAL has grown this far regardless (a backstop).
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so a transaction never fails half-way when
        # another process (a backup, an admin shell) holds the file.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# A writer's own WAL checkpoint only past this many pages (SQLite's default: 1,000), see
# storage/sqlite_commit.py's Checkpointer.
WAL_BACKSTOP_PAGES = 10_000

# A pooled connection unused for longer than this is checked before use.
IDLE_PING_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Replace connections that died (a database restart) before anyone uses them, like
    SQLAlchemy's pool_pre_ping, but only for connections that sat idle: a busy runtime checks
    connections out thousands of times a second, and a ping each time doubled the round trips
    of every step. A connection in constant use that breaks fails one call instead; SQLAlchemy
    then invalidates the whole pool, and callers treat that failure as a lost database (RPCs
    answer UNAVAILABLE, a run is left to be resumed)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_conn.rollback()
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(f"stale pooled connection: {exc}") from exc


class Database:
    """An engine plus the executor its blocking calls run on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        workers = 1 if engine.dialect.name == "sqlite" else 8
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopline-db")
        self._in_flight = 0  # touched on the event loop only

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking storage work on the database thread and await its result."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        bound = functools.partial(ctx.run, fn, *args, **kwargs)
        self._in_flight += 1
        try:
            return await loop.run_in_executor(self._executor, bound)
        finally:
            self._in_flight -= 1

    @property
    def idle(self) -> bool:
        """No call of this process is on (or queued for) the database threads."""
        return self._in_flight == 0

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()
