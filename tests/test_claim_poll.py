"""The runner's poll for work on SQLite, and the file's one write lock: a poll that finds nothing
to claim never takes it, so the runner's writes can run inline meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from tests.test_store import running
from tests.test_write_path import sqlite_storage


async def test_a_claim_poll_with_nothing_to_claim_takes_no_write_lock(tmp_path: Path) -> None:
    """The poll, every half second, found nothing almost always, yet took the write lock to
    look: every inline write found the file locked and queued for the database thread."""
    storage = await sqlite_storage(tmp_path)
    other = sqlite3.connect(tmp_path / "runtime.db", isolation_level=None)
    try:
        await running(storage)  # its lease is fresh: nothing to claim
        other.execute("BEGIN IMMEDIATE")  # another connection holds the lock
        batch = await asyncio.wait_for(storage.claim_next("r2", 10, 60), 5)
        assert batch.claimed == [] and batch.finished == []
        other.execute("ROLLBACK")
        fresh = (await storage.create("echo", {}, None)).operation.id
        batch = await storage.claim_next("r2", 10, 60)
        assert [claimed.operation.id for claimed in batch.claimed] == [fresh]
    finally:
        other.close()
        await storage.close()
