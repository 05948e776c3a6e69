"""SQLite's two ways of running the runner's writes: inline on the event loop, when nothing else
is queued for the database thread, and group commit otherwise (see sqlite.py for why both); and
the checkpoints that fold the WAL back into the database file, on a thread of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError

from runtime_service.database import Database
from runtime_service.storage.batching import Outcome, WriteQueue

log = logging.getLogger(__name__)

# The shortest time between two of the Checkpointer's checkpoints while writes keep coming.
CHECKPOINT_SECONDS = 0.1
# Writes gathered in the WAL before the Checkpointer folds it back (a few pages each: about
# SQLite's own default of 1,000 pages), or, for a database written to less, how long after the
# first of them it does so anyway.
CHECKPOINT_WRITES = 200
CHECKPOINT_QUIET_SECONDS = 5.0

# The most urgent writes (a stop's) run in one batch on the event loop's own thread: a few
# stops' worth. More (the halts of a bulk stop) go to the database thread, so the loop never
# holds a long transaction.
URGENT_INLINE_MAX = 16

# A write: fn(cursor, *args) inside a transaction that the caller owns and commits.
Write = Callable[..., Any]


class WouldBlock(Exception):
    """The write cannot run right here without waiting (see InlineWriter.run)."""


class InlineWriter:
    """A connection of the event loop's own to a SQLite file."""

    def __init__(self, database: str | None, dbapi: Any) -> None:
        self._path = database if database not in (None, "", ":memory:") else None
        self._dbapi = dbapi
        self._conn: Any = None

    @property
    def possible(self) -> bool:
        """Whether writes can run inline at all (a SQLite file, not an in-memory database)."""
        return self._path is not None

    def run(self, write: Write, *args: Any) -> Any:
        """write(cursor, *args) in a transaction of its own, right here on the event loop's
        thread, or WouldBlock at once if that would mean waiting. It never blocks the loop: the
        inline connection does not wait for locks (busy timeout 0) and never checkpoints the
        WAL (the database thread's connections do), so a locked file (the database thread in a
        transaction, a backup, another process) raises WouldBlock and the write is queued."""
        dbapi = self._dbapi
        connection = self._connection()
        cursor = connection.cursor()
        try:
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except dbapi.OperationalError as exc:
                raise WouldBlock(str(exc)) from exc
            try:
                result = write(cursor, *args)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
        except dbapi.Error as exc:
            cursor.close()  # before its connection: closing it after raises ProgrammingError
            self.close()
            raise DBAPIError.instance(None, None, exc, dbapi.Error) from exc
        except BaseException:
            cursor.close()
            raise
        cursor.close()
        return result

    def _connection(self) -> Any:
        if self._conn is None:
            connection = self._dbapi.connect(self._path, isolation_level=None)
            for pragma in ("busy_timeout=0", "synchronous=NORMAL", "wal_autocheckpoint=0"):
                connection.execute(f"PRAGMA {pragma}")
            self._conn = connection
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class GroupCommit(WriteQueue["_Queued"]):
    """Many small writes, one transaction: the runner's writes queue here, and the database
    thread runs everything queued so far in a single transaction. A write queued alone runs
    alone. Each write's result is handed back only after its transaction commits. If a batch
    fails, each write is retried alone, so one bad write cannot take the others' results (or
    errors) with it. (PostgreSQL's counterpart, on the event loop, is pg_batch.PostgresBatcher.)
    """

    def __init__(
        self,
        db: Database,
        run_together: Callable[[list[tuple[Write, tuple[Any, ...]]]], list[Any]],
        inline: InlineWriter,
        max_batch: int = 256,
        observe: Callable[[int, float], None] | None = None,
        translate: Callable[[BaseException], BaseException] | None = None,
        on_write: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__("group commit", max_batch, observe, translate, on_write)
        self._db = db
        self._run_together = run_together
        self._inline = inline

    @property
    def idle(self) -> bool:
        """Nothing queued or being written, and the database threads free: a write now would
        have no company and would not contend with this process for SQLite's write lock."""
        return not self.draining and self._db.idle

    def submit(
        self, write: Write, args: tuple[Any, ...], urgent: bool = False
    ) -> asyncio.Future[Any]:
        """write(cursor, *args), queued now for a shared transaction: the future of its result,
        set once that transaction has committed. `urgent`: see batching.py."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return self._enqueue(_Queued(write, args, future, time.monotonic()), urgent)

    async def _write_batch(self, batch: list[_Queued], urgent: bool) -> list[Outcome]:
        if urgent and len(batch) <= URGENT_INLINE_MAX and self._inline.possible:
            # A stop's few writes, right here: the batch before them has just committed, so
            # the write lock is free, and they wait for no hop to the database thread and no
            # turn at the GIL for each of their statements (with thousands of operations
            # stepping, the event loop holds the GIL most of the time).
            writes = [(queued.write, queued.args) for queued in batch]
            try:
                results = self._inline.run(_each, writes)
            except Exception:
                # WouldBlock (another connection holds the file) or a failed write: on the
                # database thread, which waits for the lock and runs each alone if need be.
                pass
            else:
                return [(True, result) for result in results]
        return await self._db.call(self._execute, batch)

    def _execute(self, batch: list[_Queued]) -> list[Outcome]:
        if len(batch) > 1:
            try:
                results = self._run_together([(queued.write, queued.args) for queued in batch])
            except Exception:
                pass  # each alone, below
            else:
                return [(True, result) for result in results]
        return [self._alone(queued) for queued in batch]

    def _alone(self, queued: _Queued) -> Outcome:
        try:
            return True, self._run_together([(queued.write, queued.args)])[0]
        except Exception as exc:
            return False, exc


def _each(cursor: Any, writes: list[tuple[Write, tuple[Any, ...]]]) -> list[Any]:
    return [write(cursor, *args) for write, args in writes]


@dataclass(eq=False)
class _Queued:
    write: Write
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    began: float


class Checkpointer:
    """Copies the WAL into the database file on a thread of its own, so no write waits for it.

    By default (wal_autocheckpoint) the writer whose commit takes the WAL past 1,000 pages copies
    them into the database file and syncs both files before its commit returns. With 6,000
    operations running, commits took a fifth of the database thread's time, mostly these
    checkpoints, and that thread was what limited the runtime's step rate. Here a PASSIVE
    checkpoint (one that waits for no reader and no writer) runs at most every
    CHECKPOINT_SECONDS while writes keep coming; the writers' own autocheckpoint stays, set high
    (database.py), as a backstop should this one fall behind or stop.

    It waits for CHECKPOINT_WRITES writes (or CHECKPOINT_QUIET_SECONDS after the first) rather
    than running after every write: the first commit after a complete checkpoint starts the WAL
    over and syncs its new header (fdatasync, even at synchronous=NORMAL). Checkpointed after
    each write, a lightly loaded runtime paid that sync on nearly every write, a stop's
    included: about 0.2 ms of a 0.25 ms commit on this VM, against 0.04 ms appending to the WAL.
    """

    def __init__(
        self,
        database: str | None,
        dbapi: Any,
        interval: float = CHECKPOINT_SECONDS,
        writes: int = CHECKPOINT_WRITES,
        quiet: float = CHECKPOINT_QUIET_SECONDS,
    ):
        self._path = database if database not in (None, "", ":memory:") else None
        self._dbapi = dbapi
        self._interval = interval
        self._writes = writes
        self._quiet = quiet
        self._pending = 0  # writes since the last checkpoint began
        self._enough = asyncio.Event()
        self._wrote = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: Any = None
        self._closed = False
        self.checkpoints = 0  # how many have run (tests wait on it)

    def wrote(self) -> None:
        """A write committed: checkpoint soon (on the event loop's thread)."""
        if self._path is None or self._closed:
            return
        self._pending += 1
        self._wrote.set()
        if self._pending >= self._writes:
            self._enough.set()
        if self._task is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="stopline-checkpoint")
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="sqlite checkpoints"
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wrote.wait()
            if not self._enough.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._enough.wait(), self._quiet)
            self._wrote.clear()
            self._enough.clear()
            self._pending = 0
            try:
                complete = await loop.run_in_executor(self._executor, self._checkpoint)
            except self._dbapi.Error as exc:
                log.warning("checkpointing the SQLite WAL failed (%s); the writers' will", exc)
                self.close_connection()
            else:
                self.checkpoints += 1
                if not complete:  # frames left behind: again, even if no write comes
                    self._wrote.set()
                    self._enough.set()
            await asyncio.sleep(self._interval)  # pacing: what comes meanwhile waits for one

    def _checkpoint(self) -> bool:
        """One PASSIVE checkpoint; whether it copied every frame of the WAL (it leaves those a
        reader of an older snapshot may still need, and waits for no one)."""
        if self._conn is None:
            connection = self._dbapi.connect(
                self._path, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA busy_timeout=0")
            self._conn = connection
        busy, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return not busy and copied >= frames

    def close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    async def close(self) -> None:
        self._closed = True  # a write that lands during shutdown starts nothing new
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            # A checkpoint in flight finishes first; its connection is closed after it.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
            self._executor = None
        self.close_connection()
