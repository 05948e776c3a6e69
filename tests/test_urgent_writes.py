"""A stop's writes skip SQLite's write queue (storage/batching.py): recording a stop and the halt
it causes go in the next batch, alone, however many writes of other operations are queued, and
that batch runs on the event loop's own thread."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtime_service.domain import EventKind, InterruptOutcome, StopCause
from runtime_service.storage import SqliteStorage
from runtime_service.storage.batching import Outcome, WriteQueue
from tests.conftest import eventually, opened_storage
from tests.test_store import running


@dataclass(eq=False)
class Item:
    name: str
    future: asyncio.Future[Any]
    began: float = 0.0


@dataclass
class Recorded(WriteQueue[Item]):
    """Writes nothing: records each batch, and holds the first until `release` is set."""

    batches: list[tuple[list[str], bool]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        super().__init__("recorded", max_batch=8)

    async def _write_batch(self, batch: list[Item], urgent: bool) -> list[Outcome]:
        self.batches.append(([item.name for item in batch], urgent))
        if len(self.batches) == 1:
            await self.release.wait()
        return [(True, item.name) for item in batch]


async def test_urgent_writes_go_next_in_a_batch_of_their_own() -> None:
    queue = Recorded()
    loop = asyncio.get_running_loop()

    def put(name: str, urgent: bool = False) -> asyncio.Future[Any]:
        return queue._enqueue(Item(name, loop.create_future()), urgent)

    first = put("in flight")
    await asyncio.sleep(0)  # the drainer takes it: a batch in flight
    others = [put("a"), put("b")]
    stops = [put("stop 1", urgent=True), put("stop 2", urgent=True)]
    later = put("c")
    queue.release.set()
    assert await asyncio.gather(first, *others, *stops, later) == [
        "in flight", "a", "b", "stop 1", "stop 2", "c",
    ]  # fmt: skip
    assert queue.batches == [
        (["in flight"], False),
        (["stop 1", "stop 2"], True),
        (["a", "b", "c"], False),
    ]


async def test_a_stop_and_its_halt_overtake_queued_writes_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the database thread busy and writes of other operations queued behind it, the stop
    and the halt commit next, on the event loop's thread (the write lock is free between two
    batches), and the queued writes after them, on the database thread."""
    storage = await opened_storage(f"sqlite:///{tmp_path / 'runtime.db'}")
    assert isinstance(storage, SqliteStorage)
    try:
        chunked = [await running(storage) for _ in range(3)]
        stopped, halted = await running(storage), await running(storage)
        gate, entered = threading.Event(), threading.Event()
        threads: dict[str, int] = {}
        landed: list[str] = []

        def held(cursor: Any) -> None:
            entered.set()
            assert gate.wait(10), "the test never opened the gate"

        def note(name: str, future: asyncio.Future[Any]) -> None:
            future.add_done_callback(lambda _: landed.append(name))

        note("held", storage._group.submit(held, ()))  # the database thread, busy
        assert await asyncio.to_thread(entered.wait, 10)
        for op_id in chunked:
            append = storage.append_soon(
                op_id, EventKind.OUTPUT_CHUNK, {"step": 0, "text": "queued"}, "r", False
            )
            note(f"chunk {op_id}", append)
        assert not storage._group.idle
        original = storage._record_stop

        def record_stop(cursor: Any, *args: Any) -> Any:
            threads["stop"] = threading.get_ident()
            return original(cursor, *args)

        monkeypatch.setattr(storage, "_record_stop", record_stop)
        stop = asyncio.ensure_future(
            storage.record_stop(stopped, "client", "because", StopCause.USER)
        )
        halt = asyncio.ensure_future(storage.halt(halted, 0, True, "r"))
        note("stop", stop)
        note("halt", halt)
        await asyncio.sleep(0.05)
        assert landed == []  # everything waits for the batch in flight
        gate.set()
        result = await stop
        assert result is not None and result.outcome is InterruptOutcome.ACCEPTED
        interrupted = await halt
        assert interrupted is not None and interrupted.kind is EventKind.INTERRUPTED

        async def all_landed() -> bool:
            return len(landed) == 6

        await eventually(all_landed)
        assert landed[:3] == ["held", "stop", "halt"], landed
        assert threads["stop"] == threading.get_ident()  # this thread: the event loop's
        for op_id in chunked:  # the overtaken writes landed too, in full
            events = await storage.events_after(op_id, 0)
            assert events[-1].data == {"step": 0, "text": "queued"}
    finally:
        await storage.close()


async def test_a_bulk_stops_many_halts_go_to_the_database_thread(tmp_path: Path) -> None:
    """More urgent writes than a few stops' (URGENT_INLINE_MAX: the halts of a bulk stop) are
    not run on the event loop, which would hold it for their whole transaction."""
    from runtime_service.storage.sqlite_commit import URGENT_INLINE_MAX

    storage = await opened_storage(f"sqlite:///{tmp_path / 'runtime.db'}")
    assert isinstance(storage, SqliteStorage)
    try:
        gate, entered = threading.Event(), threading.Event()
        ran_on: list[int] = []

        def held(cursor: Any) -> None:
            entered.set()
            assert gate.wait(10), "the test never opened the gate"

        def urgent(cursor: Any) -> None:
            ran_on.append(threading.get_ident())

        storage._group.submit(held, ())
        assert await asyncio.to_thread(entered.wait, 10)
        many = [storage._group.submit(urgent, (), True) for _ in range(URGENT_INLINE_MAX + 1)]
        gate.set()
        await asyncio.gather(*many)
        assert len(ran_on) == URGENT_INLINE_MAX + 1
        assert threading.get_ident() not in ran_on
    finally:
        await storage.close()
