"""The runner's writes (a step boundary, output, fencing) through the storage interface on both
backends, and the SQLite side's own machinery: group commit and inline writes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from runtime_service import convert
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.schema import UTCDateTime, sqlite_utc_text
from runtime_service.storage import Appended, SqliteStorage, Storage, StorageError
from runtime_service.storage.sqlite_commit import CHECKPOINT_WRITES, Checkpointer, WouldBlock
from runtime_service.watching import _next_in_order
from stopline.errors import AlreadyExists
from stopline.json_values import dump_json, json_problem
from stopline.v1 import operation_pb2 as op_pb
from tests.conftest import eventually, opened_storage
from tests.test_store import running


async def test_advance_checkpoints_and_begins_the_next_step_in_one_write(storage: Storage) -> None:
    op_id = await running(storage)
    written = await storage.advance(op_id, 0, {"out": [1, "two"]}, {"n": 1}, "r")
    assert [(e.kind, e.data) for e in written] == [
        (EventKind.STEP_COMPLETED, {"step": 0, "output": {"out": [1, "two"]}}),
        (EventKind.STEP_STARTED, {"step": 1, "attempt": 1}),
    ]
    op = await storage.get(op_id)
    assert op is not None and op.steps_completed == 1 and op.agent_state == {"n": 1}
    stored = await storage.events_after(op_id, 0)
    assert [e.seq for e in stored] == list(range(1, op.last_seq + 1))
    assert [(e.seq, e.kind, e.data) for e in stored[-2:]] == [
        (e.seq, e.kind, e.data) for e in written
    ]
    records = await storage.step_records(op_id)
    attempts = [(r.step, r.attempt, r.outcome, r.output_json) for r in records]
    assert attempts == [
        (0, 1, "completed", json.dumps({"out": [1, "two"]}, separators=(",", ":"))),
        (1, 1, None, None),
    ]


async def test_advance_after_a_stop_checkpoints_but_begins_nothing(storage: Storage) -> None:
    op_id = await running(storage)
    await storage.record_stop(op_id, "alice", "enough")
    written = await storage.advance(op_id, 0, "out", None, "r")
    assert [e.kind for e in written] == [EventKind.STEP_COMPLETED]
    assert [r.step for r in await storage.step_records(op_id)] == [0]
    op = await storage.get(op_id)
    assert op is not None and op.steps_completed == 1 and op.status is OperationStatus.RUNNING
    assert op.last_seq == written[0].seq


async def test_writes_of_a_runner_that_lost_the_operation_are_refused(storage: Storage) -> None:
    op_id = await running(storage, "A")
    before = await storage.events_after(op_id, 0)
    assert await storage.advance(op_id, 0, "out", None, "B") == []
    assert await storage.chunk(op_id, 0, "x", "B", False) is None
    assert await storage.start_step(op_id, 0, "B") is None
    assert await storage.halt(op_id, 0, True, "B") is None
    assert await storage.events_after(op_id, 0) == before
    chunk = await storage.chunk(op_id, 0, "héllo ✓", "A", False)
    assert chunk is not None
    assert (await storage.events_after(op_id, chunk.seq - 1))[0].data["text"] == "héllo ✓"


async def test_writes_queued_together_each_get_their_own_outcome(storage: Storage) -> None:
    """Many writes at once (group-committed on SQLite, batched on PostgreSQL), several of one
    operation: each lands once, in order, with its own result; a refused one does not take the
    others with it."""
    ops = [await running(storage) for _ in range(3)]
    stopped = await running(storage)
    await storage.record_stop(stopped, "x", "")
    results = await asyncio.gather(
        *(storage.chunk(op_id, 0, f"{op_id} {n}", "r", False) for n in range(3) for op_id in ops),
        storage.chunk(stopped, 0, "refused", "r", False),
        *(storage.advance(op_id, 0, {"o": op_id}, {"s": 1}, "r") for op_id in ops),
        storage.halt(stopped, 0, True, "r"),
    )
    for written in results[10:13]:
        assert isinstance(written, list)
        assert [e.kind for e in written] == [EventKind.STEP_COMPLETED, EventKind.STEP_STARTED]
    assert isinstance(results[13], Event) and results[13].kind is EventKind.INTERRUPTED
    for op_id in [*ops, stopped]:
        stored = await storage.events_after(op_id, 0)
        op = await storage.get(op_id)
        assert op is not None and [e.seq for e in stored] == list(range(1, op.last_seq + 1))
    for op_id in ops:
        texts = [
            e.data["text"]
            for e in await storage.events_after(op_id, 0)
            if e.kind is EventKind.OUTPUT_CHUNK
        ]
        assert texts == [f"{op_id} {n}" for n in range(3)]


async def test_a_start_that_loses_the_race_for_its_key_returns_the_winner(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two starts with one key: the one that did not see the other's row before inserting
    returns the winner (or the conflict), never a database error."""
    first = await storage.create("echo", {}, "k", owner="o")
    find = storage.cursors.find_by_key  # type: ignore[attr-defined]
    looked: list[str] = []

    def not_yet(owner: str, key: str) -> Any:
        looked.append(key)
        return None if len(looked) == 1 else find(owner, key)  # as if not committed yet

    monkeypatch.setattr(storage.cursors, "find_by_key", not_yet)  # type: ignore[attr-defined]
    again = await storage.create("echo", {}, "k", owner="o")
    assert not again.created and again.operation.id == first.operation.id
    looked.clear()
    with pytest.raises(AlreadyExists):  # the stored request differs: a conflicting reuse
        await storage.create("echo", {"other": 1}, "k", owner="o")
    assert [e.seq for e in await storage.events_after(first.operation.id, 0)] == [1]


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(output=json_values, step=st.integers(0, 2**40))
def test_event_conversion_matches_the_generic_json_mapping(output: Any, step: int) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    cases: list[tuple[EventKind, dict[str, Any]]] = [
        (EventKind.STEP_COMPLETED, {"step": step, "output": output}),
        (EventKind.COMPLETED, {"result": output}),
        (EventKind.OUTPUT_CHUNK, {"step": step, "text": str(output)}),
        (EventKind.INTERRUPTED, {"mid_step": True, "step": step, "halt_ms": 1.5}),
        (EventKind.STARTED, {"from_step": step, "resumed": False}),
    ]
    for kind, data in cases:
        event = Event("op", 7, kind, data, now)
        expected = op_pb.Event(operation_id="op", seq=7, time=convert.timestamp(now))
        json_format.ParseDict(data, getattr(expected, kind.value))
        assert convert.event_to_pb(event) == expected


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.timezones(),
    )
)
def test_sqlite_time_text_is_what_sqlalchemy_would_store(moment: datetime) -> None:
    dialect = sqlite.dialect()
    sqlalchemy_own = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert sqlalchemy_own is not None
    assert sqlite_utc_text(moment) == sqlalchemy_own(moment)


def test_sqlite_time_text_refuses_a_naive_time_like_the_column_does() -> None:
    with pytest.raises(ValueError, match="naive"):
        sqlite_utc_text(datetime(2026, 1, 2))


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_dump_json_is_compact_json_that_reads_back(value: Any) -> None:
    assert dump_json(value) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    assert json.loads(dump_json(value)) == value
    assert json_problem(value) is None


def test_json_problem_names_what_json_cannot_hold() -> None:
    assert json_problem({"x": float("nan")}) is not None
    assert "set" in (json_problem({"x": {1}}) or "")
    assert "lone surrogate" in (json_problem({"text": "half \ud83d"}) or "")
    assert dump_json({"text": "whole \U0001f600"}) == '{"text":"whole \U0001f600"}'
    cycle: list[Any] = []
    cycle.append(cycle)
    assert json_problem(cycle) is not None


def test_batches_respect_count_and_size_limits() -> None:
    now = datetime.now(UTC)
    events = [
        Event("op", i, EventKind.OUTPUT_CHUNK, {"step": 0, "text": "x" * 100}, now)
        for i in range(1, 11)
    ]
    groups = list(convert.batched(events, max_events=4, max_bytes=10_000))
    assert [len(g) for g in groups] == [4, 4, 2]
    assert [e.seq for g in groups for e in g] == list(range(1, 11))
    assert [len(g) for g in convert.batched(events, max_events=100, max_bytes=250)] == [2] * 5


def test_live_events_continue_the_sequence_or_send_the_watcher_back_to_storage() -> None:
    now = datetime.now(UTC)

    def ev(seq: int, kind: EventKind = EventKind.OUTPUT_CHUNK) -> Event:
        return Event("op", seq, kind, {}, now)

    batch, back = _next_in_order([ev(3), ev(4), ev(5), ev(6)], cursor=4)
    assert [e.seq for e in batch] == [5, 6] and not back
    batch, back = _next_in_order([ev(5), ev(7)], cursor=4)
    assert [e.seq for e in batch] == [5] and back  # a gap: re-read storage
    batch, back = _next_in_order([ev(5), None, ev(6)], cursor=4)
    assert [e.seq for e in batch] == [5] and back  # a poke
    batch, back = _next_in_order([ev(5, EventKind.COMPLETED), ev(6)], cursor=4)
    assert [e.seq for e in batch] == [5] and not back


async def sqlite_storage(tmp_path: Path) -> SqliteStorage:
    opened = await opened_storage(f"sqlite:///{tmp_path / 'runtime.db'}")
    assert isinstance(opened, SqliteStorage)
    return opened


async def test_group_commit_keeps_good_writes_when_one_in_the_batch_fails(
    tmp_path: Path,
) -> None:
    """SQLite: a batch mixes every runner write; one broken write fails the shared transaction,
    and every other write still lands, exactly once, with its own result."""
    storage = await sqlite_storage(tmp_path)
    group = storage._group
    batches: list[int] = []
    together = group._run_together

    def counted(writes: list[Any]) -> list[Any]:
        batches.append(len(writes))
        return together(writes)

    group._run_together = counted
    try:
        chunked, advanced, halted = [[await running(storage) for _ in range(4)] for _ in range(3)]
        fresh = (await storage.create("echo", {}, None)).operation.id

        def broken(cursor: Any) -> Any:
            cursor.execute("INSERT INTO no_such_table VALUES (1)")

        async def run(write: Any, args: tuple[Any, ...]) -> Any:
            return await group.submit(write, args)  # queued when its task runs, as a caller's

        now = datetime.now(UTC)
        lease = storage._time(now)
        writes = [
            *(
                run(storage._append_event, (o, OUTPUT, {"step": 0, "text": f"out {o}"}, "r", False))
                for o in chunked
            ),
            run(broken, ()),
            *(
                run(storage._boundary, (_advance(), o, 0, {"o": o}, {"s": 1}, "r"))
                for o in advanced
            ),
            *(run(storage._halt, (o, 0, True, "r", None, None)) for o in halted),
            run(storage._claim_and_start, (fresh, "r", lease, now)),
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert batches[0] == len(writes), "the writes were not batched"
        # Its own failure, as storage reports it (the queue translates), caused by the SQL's.
        assert isinstance(results[4], Exception)
        assert "no_such_table" in str(results[4].__cause__)
        for op_id, appended in zip(chunked, results[:4], strict=True):
            assert isinstance(appended, Appended)
            event = appended.event
            assert event.kind is EventKind.OUTPUT_CHUNK
            stored = await storage.events_after(op_id, event.seq - 1)
            assert stored[0].data["text"] == f"out {op_id}"
        for op_id, events in zip(advanced, results[5:9], strict=True):
            assert isinstance(events, list)
            assert [e.kind for e in events] == [EventKind.STEP_COMPLETED, EventKind.STEP_STARTED]
            assert (await storage.events_after(op_id, events[0].seq - 1))[:2] == events
        for op_id, halt in zip(halted, results[9:13], strict=True):
            assert isinstance(halt, Event) and halt.kind is EventKind.INTERRUPTED
            op = await storage.get(op_id)
            assert op is not None and op.status is OperationStatus.INTERRUPTED
        assert isinstance(results[13], tuple)
        for op_id in [*chunked, *advanced, *halted, fresh]:
            op = await storage.get(op_id)
            assert op is not None
            stored = await storage.events_after(op_id, 0)
            assert [e.seq for e in stored] == list(range(1, op.last_seq + 1))
    finally:
        await storage.close()


OUTPUT = EventKind.OUTPUT_CHUNK


def _advance() -> Any:
    from runtime_service.storage import sqlite

    return sqlite._BUMP_TO_ADVANCE


async def test_inline_writes_never_wait_for_a_locked_file(tmp_path: Path) -> None:
    storage = await sqlite_storage(tmp_path)
    try:
        op_id = await running(storage)
        event = storage._inline.run(
            storage._append_event, op_id, OUTPUT, {"step": 0, "text": "now"}, "r", False
        )
        assert event is not None
        stored = await storage.events_after(op_id, event.event.seq - 1)
        assert stored[0].data == {"step": 0, "text": "now"}
        other = sqlite3.connect(tmp_path / "runtime.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
        before = await storage.events_after(op_id, 0)
        with pytest.raises(WouldBlock):
            storage._inline.run(
                storage._append_event, op_id, OUTPUT, {"step": 0, "text": "blocked"}, "r", False
            )
        other.execute("ROLLBACK")
        other.close()
        assert await storage.events_after(op_id, 0) == before
        assert (
            storage._inline.run(
                storage._append_event, op_id, OUTPUT, {"step": 0, "text": "later"}, "r", False
            )
            is not None
        )
    finally:
        await storage.close()


async def test_a_failed_write_is_a_storage_error_not_a_driver_error(tmp_path: Path) -> None:
    """Storage failures leave storage as domain errors, inline or group-committed (an inline
    write that failed used to surface as sqlite3's ProgrammingError, from closing its cursor
    after its connection, which nothing above storage handled)."""
    storage = await sqlite_storage(tmp_path)
    try:

        def broken(cursor: Any) -> Any:
            cursor.execute("INSERT INTO events (operation_id) VALUES (NULL)")

        assert storage._group.idle  # so the write runs inline
        with pytest.raises(StorageError, match="NOT NULL"):
            await storage._write(broken)
        with pytest.raises(StorageError, match="NOT NULL"):  # and on a new inline connection
            await storage._write(broken)
    finally:
        await storage.close()


async def test_the_wal_reaches_the_database_file_with_no_writer_checkpointing(
    tmp_path: Path,
) -> None:
    # Far below the writers' own backstop (WAL_BACKSTOP_PAGES): only the storage's
    # Checkpointer, on its own thread, can have copied these into the database file.
    storage = await sqlite_storage(tmp_path)
    path = tmp_path / "runtime.db"

    def in_the_file_alone(op_id: str) -> int:
        # immutable: the database file as it is, without the WAL.
        file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            found = file.execute("SELECT count(*) FROM events WHERE operation_id = ?", (op_id,))
            return int(found.fetchone()[0])
        except sqlite3.DatabaseError:  # no tables in the file yet, or read mid-checkpoint
            return 0
        finally:
            file.close()

    try:
        op_id = await running(storage)
        for n in range(CHECKPOINT_WRITES):  # enough for a checkpoint now, not after a while
            await storage.append(op_id, OUTPUT, {"step": 0, "text": f"chunk {n}"}, "r", False)
        written = len(await storage.events_after(op_id, 0))
        assert written > CHECKPOINT_WRITES

        async def all_in_the_file() -> bool:
            return await asyncio.to_thread(in_the_file_alone, op_id) == written

        await eventually(all_in_the_file)
        # Counted once the checkpoint's thread has handed back to the loop, a moment after the
        # file is complete.
        await eventually(lambda: _true(storage._checkpointer.checkpoints >= 1))
    finally:
        await storage.close()


async def test_the_wal_is_checkpointed_once_writes_gather_or_after_a_quiet_while(
    tmp_path: Path,
) -> None:
    """Not after every write: the first commit after a complete checkpoint starts the WAL over
    and syncs it, which a lightly loaded runtime paid on nearly every write (a stop's too)."""
    path = tmp_path / "wal.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (n INTEGER)")
    setup.close()

    gathering = Checkpointer(str(path), sqlite3, interval=0, writes=3, quiet=3600)
    quiet = Checkpointer(str(path), sqlite3, interval=0, writes=3600, quiet=0.05)
    try:
        gathering.wrote()
        gathering.wrote()
        quiet.wrote()
        await eventually(lambda: _true(quiet.checkpoints == 1))  # alone, after its quiet while
        assert gathering.checkpoints == 0  # two writes of three, and an hour to wait
        gathering.wrote()
        await eventually(lambda: _true(gathering.checkpoints == 1))
    finally:
        await gathering.close()
        await quiet.close()


async def _true(value: bool) -> bool:
    return value


@settings(max_examples=300, deadline=None)
@given(output=json_values, step=st.integers(0, 2**40), attempt=st.integers(1, 2**20))
def test_a_boundarys_event_texts_are_what_dump_json_makes(
    output: Any, step: int, attempt: int
) -> None:
    """The SQLite boundary builds its events' JSON from the output's JSON (one encoding less per
    step): the stored text must be exactly dump_json's, which reads and retention rely on."""
    from runtime_service.storage.sqlite_steps import completed_text, result_text, started_text

    output_json = dump_json(output)
    assert completed_text(step, output_json) == dump_json({"step": step, "output": output})
    assert result_text(output_json) == dump_json({"result": output})
    assert started_text(step, attempt) == dump_json({"step": step, "attempt": attempt})


async def test_a_cancelled_drainer_cancels_the_writes_it_held_and_queued() -> None:
    """Shutdown cancels the group-commit drainer mid-batch: the batch in flight and the writes
    queued behind it are cancelled, as a cancelled caller's await would be, rather than all
    given one CancelledError *as their exception* (a 3,000-operation runtime then logged that
    exception, unretrieved and a frame longer per future, for 13 s before it exited)."""
    from runtime_service.storage.batching import Outcome, WriteQueue

    @dataclass(eq=False)
    class Item:
        future: asyncio.Future[Any]
        began: float = 0.0

    writing = asyncio.Event()

    class Stuck(WriteQueue[Item]):
        async def _write_batch(self, batch: list[Item], urgent: bool) -> list[Outcome]:
            writing.set()
            await asyncio.Event().wait()  # a batch that never commits
            return []

    queue = Stuck("stuck", max_batch=2)
    loop = asyncio.get_running_loop()
    items = [Item(loop.create_future()) for _ in range(5)]
    futures = [queue._enqueue(item) for item in items[:2]]
    await writing.wait()
    futures += [queue._enqueue(item) for item in items[2:]]  # queued behind the stuck batch
    assert queue._drainer is not None
    queue._drainer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queue._drainer
    assert all(future.cancelled() for future in futures)


async def test_a_write_nobody_waits_for_any_more_leaves_no_unretrieved_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A queued write's future, settled by the queue itself: a caller that went away does not
    take the write back, and its failure, read by nobody, is not logged as a "Future exception
    was never retrieved" when the futures are collected; one still awaited gets the storage
    error translated (here: a DBAPIError's StorageError), and every write's time is told."""
    import gc

    from sqlalchemy.exc import DBAPIError

    from runtime_service.storage.batching import Outcome, WriteQueue
    from runtime_service.storage.errors import translation

    @dataclass(eq=False)
    class Item:
        future: asyncio.Future[Any]
        began: float

    failure = DBAPIError("INSERT", {}, Exception("boom"))
    written: list[Item] = []

    class Failing(WriteQueue[Item]):
        async def _write_batch(self, batch: list[Item], urgent: bool) -> list[Outcome]:
            written.extend(batch)
            return [(False, failure)] * len(batch)

    told: list[float] = []
    queue = Failing("failing", max_batch=8, translate=translation, on_write=told.append)
    loop = asyncio.get_running_loop()
    gone = queue._enqueue(Item(loop.create_future(), time.monotonic()))
    gone.cancel()  # its caller went away before the batch ran
    waited = queue._enqueue(Item(loop.create_future(), time.monotonic()))
    with pytest.raises(StorageError, match="boom") as raised:
        await waited
    assert raised.value.__cause__ is failure
    assert len(written) == 2 and len(told) == 2  # the abandoned write was made and timed too
    assert all(seconds >= 0 for seconds in told)
    written.clear()
    del gone, waited, raised
    with caplog.at_level("ERROR", logger="asyncio"):
        gc.collect()
    assert "never retrieved" not in caplog.text
