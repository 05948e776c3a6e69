"""The PostgreSQL batcher (runtime_service/pg_batch.py): writes queued together share one
pipelined transaction, each gets its own outcome, and a lost connection is an error for the
writes in flight only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from runtime_service.database import create_db_engine
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.hot_path import Statement
from runtime_service.migrate import upgrade_to_head
from runtime_service.notifications import libpq_url
from runtime_service.pg_batch import PostgresBatcher
from runtime_service.store import OperationStore

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[OperationStore]:
    engine = create_db_engine(postgres_url)
    upgrade_to_head(engine)
    yield OperationStore(engine)
    engine.dispose()


@pytest.fixture
async def batcher(postgres_url: str) -> AsyncIterator[PostgresBatcher]:
    batching = PostgresBatcher(libpq_url(postgres_url))
    yield batching
    await batching.close()


def running(store: OperationStore, runner: str = "r") -> str:
    op_id = store.create("echo", {}, None).operation.id
    assert store.claim(op_id, runner, 60) is not None
    assert store.start_step(op_id, 0, runner) is not None
    return op_id


def gap_free(store: OperationStore, op_id: str) -> None:
    operation = store.get(op_id)
    assert operation is not None
    seqs = [event.seq for event in store.events_after(op_id, 0)]
    assert seqs == list(range(1, operation.last_seq + 1))


async def test_writes_queued_together_each_get_their_own_outcome(
    pg_store: OperationStore, batcher: PostgresBatcher
) -> None:
    hot = pg_store.hot
    chunked = [running(pg_store) for _ in range(3)]
    advanced = [running(pg_store) for _ in range(3)]
    held = pg_store.create("echo", {}, "held-key", hold_seconds=60).operation.id
    pending = pg_store.create("echo", {}, None, hold_seconds=60).operation.id
    assert pg_store.release(pending)
    broken: Statement[Any] = Statement("SELECT * FROM no_such_table", {"id": "x"}, lambda r: r)

    writes: list[Awaitable[Any]] = [
        *(batcher.run(hot.chunk_statement(o, 0, f"out {o}", "r")) for o in chunked),
        batcher.run(broken),
        *(batcher.run(hot.advance_statement(o, 0, {"o": o}, {"s": 1}, "r")) for o in advanced),
        batcher.run(hot.release_statement(held)),
        batcher.run(hot.claim_and_start_statement(pending, "r", 60)),
        batcher.run(pg_store.create_statement("echo", {"n": 1}, "new-key", owner="alice")),
        batcher.run(pg_store.create_statement("echo", {}, "held-key")),  # the key is taken
        batcher.run(hot.chunk_statement(chunked[0], 0, "second", "other-runner")),  # not its own
        batcher.run(hot.start_step_statement(advanced[0], 2, "r")),  # a first attempt of step 2
        batcher.run(hot.complete_statement(advanced[1], 1, {"last": True}, None, "r")),
    ]
    results = await asyncio.gather(*writes, return_exceptions=True)

    assert isinstance(results[3], DBAPIError) and "no_such_table" in str(results[3])
    for op_id, event in zip(chunked, results[:3], strict=True):
        assert isinstance(event, Event) and event.kind is EventKind.OUTPUT_CHUNK
        assert pg_store.events_after(op_id, event.seq - 1)[0].data == {
            "step": 0,
            "text": f"out {op_id}",
        }
    for op_id, events in zip(advanced, results[4:7], strict=True):
        assert isinstance(events, list)
        assert [e.kind for e in events] == [EventKind.STEP_COMPLETED, EventKind.STEP_STARTED]
        assert pg_store.events_after(op_id, events[0].seq - 1)[:2] == events
    released, claimed, created, taken, foreign, restarted, finished = results[7:]
    assert isinstance(finished, list)
    assert [(e.kind, e.data) for e in finished] == [
        (EventKind.STEP_COMPLETED, {"step": 1, "output": {"last": True}}),
        (EventKind.COMPLETED, {"result": {"last": True}}),
    ]
    assert pg_store.events_after(advanced[1], finished[0].seq - 1) == finished
    done = pg_store.get(advanced[1])
    assert done is not None and done.status is OperationStatus.COMPLETED
    assert done.result == {"last": True} and done.steps_completed == 2
    assert isinstance(restarted, Event) and restarted.data == {"step": 2, "attempt": 1}
    assert released is not None and not isinstance(released, BaseException)
    assert released.id == held
    assert claimed is not None and not isinstance(claimed, BaseException)
    operation, (claim_event, started) = claimed
    assert operation.status is OperationStatus.RUNNING and operation.last_seq == started.seq
    assert (claim_event.kind, claim_event.data) == (
        EventKind.STARTED,
        {"from_step": 0, "resumed": False},
    )
    assert (started.kind, started.data) == (EventKind.STEP_STARTED, {"step": 0, "attempt": 1})
    assert pg_store.events_after(pending, claim_event.seq - 1) == [claim_event, started]
    assert [(r.step, r.attempt) for r in pg_store.step_records(pending)] == [(0, 1)]
    assert created is not None and not isinstance(created, BaseException)
    assert created.operation.owner == "alice" and created.operation.input == {"n": 1}
    assert pg_store.events_after(created.operation.id, 0) == list(created.events)
    assert taken is None
    assert foreign is None
    for op_id in [*chunked, *advanced, held, pending, created.operation.id]:
        gap_free(pg_store, op_id)


async def test_a_lost_connection_fails_the_writes_in_flight_and_the_next_reconnects(
    pg_store: OperationStore, batcher: PostgresBatcher
) -> None:
    hot = pg_store.hot
    op_id = running(pg_store)
    assert await batcher.run(hot.chunk_statement(op_id, 0, "before", "r")) is not None
    with pg_store.engine.connect() as conn:
        # Every other backend of this database: the batcher's connection among them.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    with pytest.raises(DBAPIError):
        await batcher.run(hot.chunk_statement(op_id, 0, "lost", "r"))
    after = await batcher.run(hot.chunk_statement(op_id, 0, "after", "r"))
    assert after is not None
    texts = [
        e.data["text"]
        for e in pg_store.events_after(op_id, 0)
        if e.kind is EventKind.OUTPUT_CHUNK and isinstance(e.data, dict)
    ]
    assert texts == ["before", "after"]
    gap_free(pg_store, op_id)


async def test_stops_and_halts_as_single_statements_match_what_is_stored(
    pg_store: OperationStore, batcher: PostgresBatcher
) -> None:
    hot = pg_store.hot
    running_id = running(pg_store)
    pending_id = pg_store.create("echo", {}, None, hold_seconds=60).operation.id
    stops = await asyncio.gather(
        batcher.run(pg_store.record_stop_statement(running_id, "alice", "enough")),
        batcher.run(pg_store.record_stop_statement(pending_id, "alice", "never mind")),
        batcher.run(pg_store.record_stop_statement(running_id, "bob", "again")),
    )
    on_running, on_pending, repeated = stops
    assert repeated is None  # recorded once; the slow path says why
    assert on_running is not None and on_pending is not None
    assert on_running.operation.status is OperationStatus.RUNNING
    assert [e.kind for e in on_running.events] == [EventKind.STOP_REQUESTED]
    assert on_pending.operation.status is OperationStatus.INTERRUPTED
    assert [e.kind for e in on_pending.events] == [
        EventKind.STOP_REQUESTED,
        EventKind.INTERRUPTED,
    ]
    for result in (on_running, on_pending):
        stored = pg_store.events_after(result.operation.id, result.events[0].seq - 1)
        assert stored == list(result.events)
    halted = await batcher.run(hot.finish_interrupted_statement(running_id, 0, True, "r"))
    assert halted is not None and isinstance(halted.data, dict)
    assert halted.data["mid_step"] is True and halted.data["step"] == 0
    assert isinstance(halted.data["halt_ms"], int | float) and halted.data["halt_ms"] >= 0
    assert pg_store.events_after(running_id, halted.seq - 1) == [halted]
    assert [(r.step, r.outcome) for r in pg_store.step_records(running_id)] == [(0, "interrupted")]
    operation = pg_store.get(running_id)
    assert operation is not None and operation.status is OperationStatus.INTERRUPTED
    for op_id in (running_id, pending_id):
        gap_free(pg_store, op_id)
