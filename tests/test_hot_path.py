"""The runner's hot writes (runtime_service/hot_path.py), which bypass SQLAlchemy Core: they
must keep exactly the store's invariants, on both backends."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import IntegrityError

from runtime_service import convert
from runtime_service.database import Database, GroupCommit, create_db_engine
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.hot_path import WouldBlock
from runtime_service.migrate import upgrade_to_head
from runtime_service.operations import _next_in_order
from runtime_service.store import OperationStore
from stopline.errors import AlreadyExists
from stopline.v1 import operation_pb2 as op_pb


def running(store: OperationStore, runner: str = "r") -> str:
    op_id = store.create("echo", {}, None).operation.id
    assert store.claim(op_id, runner, 60) is not None
    assert store.start_step(op_id, 0, runner) is not None
    return op_id


def test_advance_checkpoints_and_begins_the_next_step_in_one_write(store: OperationStore) -> None:
    op_id = running(store)
    written = store.advance(op_id, 0, {"out": [1, "two"]}, {"n": 1}, "r")
    assert [(e.kind, e.data) for e in written] == [
        (EventKind.STEP_COMPLETED, {"step": 0, "output": {"out": [1, "two"]}}),
        (EventKind.STEP_STARTED, {"step": 1, "attempt": 1}),
    ]
    op = store.get(op_id)
    assert op is not None and op.steps_completed == 1 and op.agent_state == {"n": 1}
    stored = store.events_after(op_id, 0)
    assert [e.seq for e in stored] == list(range(1, op.last_seq + 1))
    assert [(e.seq, e.kind, e.data) for e in stored[-2:]] == [
        (e.seq, e.kind, e.data) for e in written
    ]
    attempts = [(r.step, r.attempt, r.outcome, r.output_json) for r in store.step_records(op_id)]
    assert attempts == [
        (0, 1, "completed", json.dumps({"out": [1, "two"]}, separators=(",", ":"))),
        (1, 1, None, None),
    ]


def test_advance_after_a_stop_checkpoints_but_begins_nothing(store: OperationStore) -> None:
    op_id = running(store)
    store.record_stop(op_id, "alice", "enough")
    written = store.advance(op_id, 0, "out", None, "r")
    assert [e.kind for e in written] == [EventKind.STEP_COMPLETED]
    assert [r.step for r in store.step_records(op_id)] == [0]
    op = store.get(op_id)
    assert op is not None and op.steps_completed == 1 and op.status is OperationStatus.RUNNING
    assert op.last_seq == written[0].seq


def test_writes_of_a_runner_that_lost_the_operation_are_refused(store: OperationStore) -> None:
    op_id = running(store, "A")
    before = store.events_after(op_id, 0)
    assert store.advance(op_id, 0, "out", None, "B") == []
    assert store.append_chunk(op_id, 0, "x", "B") is None
    assert store.events_after(op_id, 0) == before
    chunk = store.append_chunk(op_id, 0, "héllo ✓", "A")
    assert (
        chunk is not None and store.events_after(op_id, chunk.seq - 1)[0].data["text"] == "héllo ✓"
    )


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


async def test_group_commit_keeps_good_writes_when_one_in_the_batch_fails(
    store: OperationStore,
) -> None:
    """A batch mixes every runner write (on PostgreSQL, pipelined); one broken write fails the
    shared transaction, and every other write still lands, exactly once, with its own result."""
    hot = store.hot
    db = Database(store.engine)
    batches: list[int] = []

    def run_together(writes: list[Any]) -> list[Any]:
        batches.append(len(writes))
        return hot.run_together(writes)

    group = GroupCommit(db, run_together)
    chunked, advanced, halted = ([running(store) for _ in range(4)] for _ in range(3))
    fresh = store.create("echo", {}, None).operation.id
    assert store.claim(fresh, "r", 60) is not None

    def broken(cursor: Any) -> Any:
        cursor.execute("INSERT INTO no_such_table VALUES (1)")
        return lambda: None

    def broken_alone() -> None:
        with hot.transaction() as cursor:
            broken(cursor)

    try:
        writes = [
            *(
                group.run(hot.append_chunk_in, hot.append_chunk, o, 0, f"out {o}", "r")
                for o in chunked
            ),
            group.run(broken, broken_alone),
            *(
                group.run(hot.advance_in, hot.advance, o, 0, {"o": o}, {"s": 1}, "r")
                for o in advanced
            ),
            *(
                group.run(hot.finish_interrupted_in, hot.finish_interrupted, o, 0, True, "r")
                for o in halted
            ),
            group.run(hot.start_step_in, hot.start_step, fresh, 0, "r"),
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
    finally:
        db.close()
    assert batches[0] == len(writes), "the writes were not batched"
    assert isinstance(results[4], Exception) and "no_such_table" in str(results[4])
    for op_id, event in zip(chunked, results[:4], strict=True):
        assert isinstance(event, Event) and event.kind is EventKind.OUTPUT_CHUNK
        assert store.events_after(op_id, event.seq - 1)[0].data["text"] == f"out {op_id}"
    for op_id, events in zip(advanced, results[5:9], strict=True):
        assert isinstance(events, list)
        assert [e.kind for e in events] == [EventKind.STEP_COMPLETED, EventKind.STEP_STARTED]
        assert store.events_after(op_id, events[0].seq - 1)[:2] == events
    for op_id, event in zip(halted, results[9:13], strict=True):
        assert isinstance(event, Event) and event.kind is EventKind.INTERRUPTED
        op = store.get(op_id)
        assert op is not None and op.status is OperationStatus.INTERRUPTED
    assert isinstance(results[13], Event) and results[13].kind is EventKind.STEP_STARTED
    for op_id in [*chunked, *advanced, *halted, fresh]:
        op = store.get(op_id)
        assert op is not None
        assert [e.seq for e in store.events_after(op_id, 0)] == list(range(1, op.last_seq + 1))


async def test_group_commit_batches_several_writes_of_one_operation_in_order(
    store: OperationStore,
) -> None:
    hot = store.hot
    db = Database(store.engine)
    group = GroupCommit(db, hot.run_together)
    ops = [running(store) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *(
                group.run(hot.append_chunk_in, hot.append_chunk, op_id, 0, f"{op_id} {n}", "r")
                for n in range(3)
                for op_id in reversed(ops)
            )
        )
    finally:
        db.close()
    assert all(isinstance(event, Event) for event in results)
    for op_id in ops:
        texts = [
            e.data["text"] for e in store.events_after(op_id, 0) if e.kind is EventKind.OUTPUT_CHUNK
        ]
        assert texts == [f"{op_id} {n}" for n in range(3)]


def test_inline_writes_never_wait_for_a_locked_file(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'inline.db'}")
    upgrade_to_head(engine)
    store = OperationStore(engine)
    try:
        op_id = running(store)
        event = store.hot.inline(store.hot.append_chunk_in, op_id, 0, "now", "r")
        assert event is not None and store.events_after(op_id, event.seq - 1)[0].data == {
            "step": 0,
            "text": "now",
        }
        other = sqlite3.connect(tmp_path / "inline.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
        before = store.events_after(op_id, 0)
        with pytest.raises(WouldBlock):
            store.hot.inline(store.hot.append_chunk_in, op_id, 0, "blocked", "r")
        other.execute("ROLLBACK")
        other.close()
        assert store.events_after(op_id, 0) == before
        assert store.hot.inline(store.hot.append_chunk_in, op_id, 0, "later", "r") is not None
    finally:
        store.hot.close()
        engine.dispose()


def test_only_sqlite_files_are_written_inline(store: OperationStore) -> None:
    op_id = running(store)
    if store.engine.dialect.name == "sqlite":
        assert store.hot.inline(store.hot.append_chunk_in, op_id, 0, "x", "r") is not None
        store.hot.close()
    else:
        with pytest.raises(WouldBlock):
            store.hot.inline(store.hot.append_chunk_in, op_id, 0, "x", "r")


def test_a_duplicate_idempotency_key_is_sqlalchemys_integrity_error(store: OperationStore) -> None:
    """The store's race handling (two starts with one key) catches SQLAlchemy's IntegrityError;
    the raw path must raise that, not the driver's own exception."""
    now = datetime.now(UTC)
    columns = {
        "agent": "echo",
        "input": "{}",
        "hash": "h",
        "key": "k",
        "owner": "o",
        "labels": None,
    }
    with store.hot.transaction() as cursor:
        store.hot.create_in(cursor, str(uuid.uuid4()), columns, None, now)
    with pytest.raises(IntegrityError), store.hot.transaction() as cursor:
        store.hot.create_in(cursor, str(uuid.uuid4()), columns, None, now)
    with pytest.raises(AlreadyExists):  # the stored request differs: a conflicting reuse
        store.create("echo", {}, "k", owner="o")
