"""Sharing SQLite's one write lock. Group-committed batches run on the event loop's own thread
while the lock is free, on the database thread when another connection holds it, and never more
than one batch before the loop's other work gets a turn; the poll for work takes no write lock
when it finds nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from runtime_service.domain import EventKind
from runtime_service.storage import Appended, SqliteStorage
from tests.conftest import eventually
from tests.test_store import running
from tests.test_write_path import sqlite_storage

OUTPUT = EventKind.OUTPUT_CHUNK


class Noted:
    """An output write that notes the thread it ran on and the order writes ran in."""

    def __init__(self, storage: SqliteStorage, operation_id: str) -> None:
        self.storage = storage
        self.operation_id = operation_id
        self.threads: list[int] = []
        self.order: list[str] = []

    def __call__(self, cur: Any, text: str) -> Appended | None:
        self.threads.append(threading.get_ident())
        self.order.append(text)
        data: dict[str, Any] = {"step": 0, "text": text}
        return self.storage._append_event(cur, self.operation_id, OUTPUT, data, "r", False)

    async def stored(self) -> list[str]:
        events = await self.storage.events_after(self.operation_id, 0)
        return [str(e.data["text"]) for e in events if e.kind is OUTPUT]


async def test_a_batch_runs_on_the_event_loops_thread_while_the_write_lock_is_free(
    tmp_path: Path,
) -> None:
    storage = await sqlite_storage(tmp_path)
    try:
        noted = Noted(storage, await running(storage))
        results = await asyncio.gather(
            *(storage._group.submit(noted, (f"t{i}",)) for i in range(3))
        )
        assert noted.threads == [threading.get_ident()] * 3
        assert [r.event.data["text"] for r in results if r is not None] == ["t0", "t1", "t2"]
        assert await noted.stored() == ["t0", "t1", "t2"]
    finally:
        await storage.close()


async def test_a_batch_the_file_is_locked_for_waits_on_the_database_thread_not_the_loop(
    tmp_path: Path,
) -> None:
    storage = await sqlite_storage(tmp_path)
    other = sqlite3.connect(tmp_path / "runtime.db", isolation_level=None)
    try:
        noted = Noted(storage, await running(storage))
        other.execute("BEGIN IMMEDIATE")  # another connection (a backup, a shell) holds the lock
        pending = [storage._group.submit(noted, (f"l{i}",)) for i in range(3)]

        async def on_the_database_thread() -> bool:
            return not storage.db.idle  # the loop goes on: this probe runs while it waits

        await eventually(on_the_database_thread)
        assert not any(future.done() for future in pending)
        other.execute("ROLLBACK")
        results = await asyncio.gather(*pending)
        assert all(isinstance(result, Appended) for result in results)
        assert noted.threads and threading.get_ident() not in noted.threads
        assert await noted.stored() == ["l0", "l1", "l2"]
    finally:
        other.close()
        await storage.close()


async def test_the_loop_gets_a_turn_between_two_batches(tmp_path: Path) -> None:
    storage = await sqlite_storage(tmp_path)
    try:
        noted = Noted(storage, await running(storage))
        group = storage._group
        group._max_batch = 2
        loop = asyncio.get_running_loop()

        def scheduling(cur: Any, text: str) -> Appended | None:
            # Scheduled while the first batch runs: it must run before the second batch does.
            loop.call_soon(noted.order.append, "the loop's turn")
            return noted(cur, text)

        futures = [group.submit(scheduling, ("b0",))]
        futures += [group.submit(noted, (f"b{i}",)) for i in range(1, 4)]
        await asyncio.gather(*futures)
        assert noted.order == ["b0", "b1", "the loop's turn", "b2", "b3"]
        assert await noted.stored() == ["b0", "b1", "b2", "b3"]
    finally:
        await storage.close()


async def test_a_claim_poll_with_nothing_to_claim_takes_no_write_lock(tmp_path: Path) -> None:
    """The runner's poll for work, every half second, found nothing almost always, yet took the
    file's write lock to look: the batches on the loop could not write meanwhile."""
    storage = await sqlite_storage(tmp_path)
    other = sqlite3.connect(tmp_path / "runtime.db", isolation_level=None)
    try:
        await running(storage)  # its lease is fresh: nothing to claim
        other.execute("BEGIN IMMEDIATE")
        batch = await asyncio.wait_for(storage.claim_next("r2", 10, 60), 5)
        assert batch.claimed == [] and batch.finished == []
        other.execute("ROLLBACK")
        fresh = (await storage.create("echo", {}, None)).operation.id
        batch = await storage.claim_next("r2", 10, 60)
        assert [claimed.operation.id for claimed in batch.claimed] == [fresh]
    finally:
        other.close()
        await storage.close()
