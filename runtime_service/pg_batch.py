"""The runner's hottest writes on PostgreSQL (an output chunk, a step boundary), batched and
pipelined on one connection that the event loop drives itself.

Why not the database threads, like every other call: with hundreds of operations running, the
event loop holds the GIL most of the time, and a database thread has to win it back after every
socket wait; a batch of a few dozen writes that takes 2 ms on a quiet process took 12 ms that
way (bench: the concurrency scenario). Here the statements go out, and their rows come back,
between the loop's other work, with no thread to wake and no GIL to hand over.

Each write is one statement (see HotPath.chunk_statement and advance_statement). Writes queued
together run as one transaction in one pipeline: one round trip and one commit for the lot. A
write queued alone runs alone, in autocommit. If a batch fails, each of its writes is retried
alone, so one bad write cannot take the others' outcomes with it. A batch locks its operations'
rows in operation-id order, as lease renewal does, so two transactions never wait for each
other in a cycle.

Errors reach callers as SQLAlchemy's DBAPIError, like every other database error in the
runtime: the runner then treats the database as lost (leaves the operation for recovery). A
broken connection is dropped and the next write opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import DBAPIError

from runtime_service.hot_path import Statement

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5


@dataclass(eq=False)
class _Queued:
    statement: Statement[Any]
    future: asyncio.Future[Any]


class PostgresBatcher:
    def __init__(self, conninfo: str, max_batch: int = 256) -> None:
        import psycopg  # here: PostgreSQL's driver is an optional dependency

        self._psycopg = psycopg
        self._conninfo = conninfo
        self._max_batch = max_batch
        self._queue: deque[_Queued] = deque()
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._closed = False

    async def run(self, statement: Statement[T]) -> T:
        """The statement's outcome once it has committed."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(statement, future))
        if not self._draining:
            self._draining = True
            self._drainer = asyncio.create_task(self._drain(), name="postgres batch")
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            with contextlib.suppress(self._psycopg.Error):
                await self._connection.close()
            self._connection = None

    async def _drain(self) -> None:
        try:
            while self._queue:
                size = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(size)]
                outcomes = await self._execute(batch)
                for queued, (ok, value) in zip(batch, outcomes, strict=True):
                    if queued.future.done():
                        continue  # its caller went away; the write itself stands
                    if ok:
                        queued.future.set_result(value)
                    else:
                        queued.future.set_exception(value)
        except BaseException as exc:  # the loop is going away: fail whatever is left
            for queued in self._queue:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            self._queue.clear()
            raise
        finally:
            self._draining = False

    async def _execute(self, batch: list[_Queued]) -> list[tuple[bool, Any]]:
        if len(batch) > 1:
            # Stable: two writes of one operation keep their order.
            order = sorted(range(len(batch)), key=lambda i: str(batch[i].statement.params["id"]))
            try:
                results = await self._together([batch[i].statement for i in order])
            except DBAPIError:
                pass  # retried one by one below: each gets its own outcome
            else:
                outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
                for i, result in zip(order, results, strict=True):
                    outcomes[i] = (True, result)
                return outcomes
        return [await self._alone(queued.statement) for queued in batch]

    async def _together(self, statements: list[Statement[Any]]) -> list[Any]:
        async with self._using() as conn:
            cursors = [conn.cursor() for _ in statements]
            try:
                async with conn.pipeline(), conn.transaction():
                    for cursor, statement in zip(cursors, statements, strict=True):
                        await cursor.execute(statement.sql, statement.params)
                return [
                    statement.read(await cursor.fetchone())
                    for cursor, statement in zip(cursors, statements, strict=True)
                ]
            finally:
                for cursor in cursors:
                    await cursor.close()

    async def _alone(self, statement: Statement[Any]) -> tuple[bool, Any]:
        try:
            async with self._using() as conn, conn.cursor() as cursor:
                await cursor.execute(statement.sql, statement.params)
                return True, statement.read(await cursor.fetchone())
        except DBAPIError as exc:
            return False, exc

    @contextlib.asynccontextmanager
    async def _using(self) -> Any:
        """The connection, opened if need be; psycopg errors re-raised as SQLAlchemy's, and a
        connection that broke dropped (the next write opens another)."""
        try:
            if self._connection is None or self._connection.closed:
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
