"""The runner's hottest writes on PostgreSQL (an output chunk, a step boundary), batched and
pipelined on one connection that the event loop drives itself.

Why not the database threads, like every other call: with hundreds of operations running, the
event loop holds the GIL most of the time, and a database thread has to win it back after every
socket wait; a batch of a few dozen writes that takes 2 ms on a quiet process took 12 ms that
way (bench: the concurrency scenario). Here the statements go out, and their rows come back,
between the loop's other work, with no thread to wake and no GIL to hand over.

Each write is one statement (see postgres.py). A write queued
alone runs alone, in autocommit, as an ordinary prepared statement. Writes queued together go
out as one query string of `EXECUTE`s of statements prepared once per connection: PostgreSQL runs
a multi-statement query as one transaction, so the lot costs one round trip and one commit, and
the event loop waits for the answer once (a pipeline of separate statements waits once per
statement, and a busy loop makes each of those waits a full turn of everything else it runs).
If a batch fails, each of its writes is retried alone, so one bad write cannot take the others'
outcomes with it (unless the connection itself failed: then they all fail, at once). A batch
locks its operations' rows in operation-id order, as lease renewal does, so two transactions
never wait for each other in a cycle.

Errors leave the batcher as SQLAlchemy's DBAPIError, like every other database error inside
storage (where they leave storage, they become domain errors: see errors.py). A broken
connection is dropped and the next write opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError

from runtime_service.storage.batching import Outcome, WriteQueue
from runtime_service.storage.sql import PgSql

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5


@dataclass(frozen=True, slots=True)
class Statement(Generic[T]):
    """A write as data, so that a batch can send many at once and read each outcome from its
    returned row."""

    sql: PgSql
    params: dict[str, Any]
    read: Callable[[Any], T]  # the statement's one returned row, or None -> the outcome


@dataclass(eq=False)
class _Queued:
    statement: Statement[Any]
    future: asyncio.Future[Any]
    began: float


class PostgresBatcher(WriteQueue[_Queued]):
    def __init__(
        self,
        conninfo: str,
        max_batch: int = 256,
        observe: Callable[[int, float], None] | None = None,
        translate: Callable[[BaseException], BaseException] | None = None,
        on_write: Callable[[float], None] | None = None,
    ) -> None:
        import psycopg  # here: PostgreSQL's driver is an optional dependency

        super().__init__("postgres batch", max_batch, observe, translate, on_write)
        self._psycopg = psycopg
        self._conninfo = conninfo
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._closed = False
        self._prepared: set[str] = set()  # on the current connection

    def submit(self, statement: Statement[T]) -> asyncio.Future[T]:
        """The statement, queued now: the future of its outcome, set once it has committed."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        queued: asyncio.Future[T] = self._enqueue(_Queued(statement, future, time.monotonic()))
        return queued

    async def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            with contextlib.suppress(self._psycopg.Error):
                await self._connection.close()
            self._connection = None

    async def _write_batch(self, batch: list[_Queued], urgent: bool) -> list[Outcome]:
        if len(batch) > 1:
            # Stable: two writes of one operation keep their order.
            order = sorted(range(len(batch)), key=lambda i: str(batch[i].statement.params["id"]))
            try:
                results = await self._together([batch[i].statement for i in order])
            except DBAPIError as exc:
                if self._connection is None:
                    return [(False, exc)] * len(batch)  # the connection failed: so would each
                # Retried one by one below: each gets its own outcome.
            else:
                outcomes: list[Outcome] = [(False, None)] * len(batch)
                for i, result in zip(order, results, strict=True):
                    outcomes[i] = (True, result)
                return outcomes
        return [await self._alone(queued.statement) for queued in batch]

    async def _together(self, statements: list[Statement[Any]]) -> list[Any]:
        async with self._using() as conn:
            for statement in statements:
                prepare = statement.sql.prepare
                if prepare not in self._prepared:
                    await conn.execute(prepare)
                    self._prepared.add(prepare)
            cursor = self._psycopg.AsyncClientCursor(conn)
            try:
                calls = [
                    cursor.mogrify(statement.sql.execute, statement.params)
                    for statement in statements
                ]
                await cursor.execute(";\n".join(calls))
                rows = [await cursor.fetchone()]
                while cursor.nextset():
                    rows.append(await cursor.fetchone())
            finally:
                await cursor.close()
        return [statement.read(row) for statement, row in zip(statements, rows, strict=True)]

    async def _alone(self, statement: Statement[Any]) -> Outcome:
        try:
            async with self._using() as conn, conn.cursor() as cursor:
                await cursor.execute(statement.sql.pyformat, statement.params)
                return True, statement.read(await cursor.fetchone())
        except DBAPIError as exc:
            return False, exc

    @contextlib.asynccontextmanager
    async def _using(self) -> Any:
        """The connection, opened if need be; psycopg errors re-raised as SQLAlchemy's, and a
        connection that broke dropped (the next write opens another)."""
        try:
            if self._connection is None or self._connection.closed:
                self._prepared.clear()
                self._connection = await self._psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
                )
            yield self._connection
        except self._psycopg.Error as exc:
            connection, self._connection = self._connection, None
            if connection is not None and not connection.closed and not connection.broken:
                self._connection = connection  # a statement failed; the connection is fine
            elif connection is not None:
                with contextlib.suppress(self._psycopg.Error):
                    await connection.close()
            raise DBAPIError.instance(None, None, exc, self._psycopg.Error) from exc
        except BaseException:
            # Interrupted mid-exchange (cancelled): the connection's state is unknown, so the
            # next write starts on a new one.
            connection, self._connection = self._connection, None
            if connection is not None:
                with contextlib.suppress(BaseException):
                    await connection.close()
            raise
