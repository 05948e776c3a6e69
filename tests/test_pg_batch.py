"""PostgreSQL's side of storage: writes queued together share one transaction (the batcher,
runtime_service/storage/pg_batch.py), each gets its own outcome, a lost connection is an error
for the writes in flight only; and statement parameters are derived from the SQL."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from sqlalchemy import text

from runtime_service.database import Database, create_db_engine
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.migrate import upgrade_to_head
from runtime_service.storage import PostgresStorage, Storage, postgres_sql
from runtime_service.storage.pg_batch import Statement
from runtime_service.storage.sql import PgSql, Sql
from stopline.errors import Unavailable
from tests.conftest import eventually, opened_storage
from tests.test_store import running


@pytest.fixture
async def pg_storage(postgres_url: str) -> AsyncIterator[PostgresStorage]:
    """One batcher, so that the tests here see every write queue in one place."""
    engine = create_db_engine(postgres_url)
    upgrade_to_head(engine)
    opened = PostgresStorage(Database(engine), postgres_url, write_connections=1)
    try:
        yield opened
    finally:
        await opened.close()


async def gap_free(storage: Storage, op_id: str) -> None:
    operation = await storage.get(op_id)
    assert operation is not None
    seqs = [event.seq for event in await storage.events_after(op_id, 0)]
    assert seqs == list(range(1, operation.last_seq + 1))


@pytest.mark.postgres
async def test_writes_queued_together_each_get_their_own_outcome(
    pg_storage: PostgresStorage,
) -> None:
    storage = pg_storage
    chunked = [await running(storage) for _ in range(3)]
    advanced = [await running(storage) for _ in range(3)]
    held = (await storage.create("echo", {}, "held-key", hold_seconds=60)).operation.id
    pending = (await storage.create("echo", {}, None, hold_seconds=60)).operation.id
    assert await storage.release(pending) is not None
    bad = PgSql("SELECT * FROM no_such_table WHERE id = :id", id="text")
    broken: Statement[Any] = Statement(bad, {"id": "x"}, lambda r: r)
    batches: list[int] = []
    write_batch = storage.batchers[0]._write_batch

    async def counted(batch: list[Any], urgent: bool) -> Any:
        batches.append(len(batch))
        return await write_batch(batch, urgent)

    storage.batchers[0]._write_batch = counted  # type: ignore[method-assign]

    async def _submitted(batcher: Any, statement: Statement[Any]) -> Any:
        return await batcher.submit(statement)  # queued when its task runs, as a caller's

    writes: list[Awaitable[Any]] = [
        *(storage.chunk(o, 0, f"out {o}", "r", False) for o in chunked),
        _submitted(storage.batchers[0], broken),
        *(storage.advance(o, 0, {"o": o}, {"s": 1}, "r") for o in advanced),
        storage.release(held),
        storage.claim_and_start(pending, "r", 60),
        storage.create("echo", {"n": 1}, "new-key", owner="alice"),
        storage.create("echo", {}, "held-key"),  # the key is taken: its twin
        storage.chunk(chunked[0], 0, "second", "other-runner", False),  # not its own
        storage.start_step(advanced[0], 2, "r"),  # a first attempt of step 2
        storage.complete(advanced[1], 1, {"last": True}, None, "r"),
    ]
    results = await asyncio.gather(*writes, return_exceptions=True)

    assert batches[0] == len(writes), "the writes were not batched"
    assert isinstance(results[3], Exception) and "no_such_table" in str(results[3])
    for op_id, event in zip(chunked, results[:3], strict=True):
        assert isinstance(event, Event) and event.kind is EventKind.OUTPUT_CHUNK
        stored = await storage.events_after(op_id, event.seq - 1)
        assert stored[0].data == {"step": 0, "text": f"out {op_id}"}
    for op_id, events in zip(advanced, results[4:7], strict=True):
        assert isinstance(events, list)
        assert [e.kind for e in events] == [EventKind.STEP_COMPLETED, EventKind.STEP_STARTED]
        assert (await storage.events_after(op_id, events[0].seq - 1))[:2] == events
    released, claimed, created, twin, foreign, restarted, finished = results[7:]
    assert isinstance(finished, list)
    assert [(e.kind, e.data) for e in finished] == [
        (EventKind.STEP_COMPLETED, {"step": 1, "output": {"last": True}}),
        (EventKind.COMPLETED, {"result": {"last": True}}),
    ]
    assert await storage.events_after(advanced[1], finished[0].seq - 1) == finished
    done = await storage.get(advanced[1])
    assert done is not None and done.status is OperationStatus.COMPLETED
    assert done.result == {"last": True} and done.steps_completed == 2
    assert isinstance(restarted, Event) and restarted.data == {"step": 2, "attempt": 1}
    assert released is not None and not isinstance(released, BaseException)
    assert released.id == held
    assert claimed is not None and not isinstance(claimed, BaseException)
    claim, started = claimed
    assert claim.operation.status is OperationStatus.RUNNING
    assert claim.operation.last_seq == started.seq
    assert (claim.event.kind, claim.event.data) == (
        EventKind.STARTED,
        {"from_step": 0, "resumed": False},
    )
    assert (started.kind, started.data) == (EventKind.STEP_STARTED, {"step": 0, "attempt": 1})
    assert await storage.events_after(pending, claim.event.seq - 1) == [claim.event, started]
    assert [(r.step, r.attempt) for r in await storage.step_records(pending)] == [(0, 1)]
    assert created is not None and not isinstance(created, BaseException)
    assert created.operation.owner == "alice" and created.operation.input == {"n": 1}
    assert await storage.events_after(created.operation.id, 0) == list(created.events)
    assert not isinstance(twin, BaseException)
    assert not twin.created and twin.operation.id == held
    assert foreign is None
    for op_id in [*chunked, *advanced, held, pending, created.operation.id]:
        await gap_free(storage, op_id)


@pytest.mark.postgres
async def test_a_lost_connection_fails_the_writes_in_flight_and_the_next_reconnects(
    pg_storage: PostgresStorage,
) -> None:
    storage = pg_storage
    op_id = await running(storage)
    assert await storage.chunk(op_id, 0, "before", "r", False) is not None
    with storage.engine.connect() as conn:
        # Every other backend of this database: the batcher's connection among them.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    with pytest.raises(Unavailable):  # a domain error: nothing above storage sees psycopg's
        await storage.chunk(op_id, 0, "lost", "r", False)
    after = await storage.chunk(op_id, 0, "after", "r", False)
    assert after is not None
    texts = [
        e.data["text"]
        for e in await storage.events_after(op_id, 0)
        if e.kind is EventKind.OUTPUT_CHUNK and isinstance(e.data, dict)
    ]
    assert texts == ["before", "after"]
    await gap_free(storage, op_id)


@pytest.mark.postgres
async def test_stops_and_halts_as_single_statements_match_what_is_stored(
    pg_storage: PostgresStorage,
) -> None:
    storage = pg_storage
    running_id = await running(storage)
    pending_id = (await storage.create("echo", {}, None, hold_seconds=60)).operation.id
    stops = await asyncio.gather(
        storage.record_stop(running_id, "alice", "enough"),
        storage.record_stop(pending_id, "alice", "never mind"),
        storage.record_stop(running_id, "bob", "again"),
    )
    on_running, on_pending, repeated = stops
    assert repeated is not None and repeated.outcome.value == "ALREADY_REQUESTED"
    assert on_running is not None and on_pending is not None
    assert on_running.operation.status is OperationStatus.RUNNING
    assert [e.kind for e in on_running.events] == [EventKind.STOP_REQUESTED]
    assert on_pending.operation.status is OperationStatus.INTERRUPTED
    assert [e.kind for e in on_pending.events] == [
        EventKind.STOP_REQUESTED,
        EventKind.INTERRUPTED,
    ]
    for result in (on_running, on_pending):
        stored = await storage.events_after(result.operation.id, result.events[0].seq - 1)
        assert stored == list(result.events)
    halted = await storage.halt(running_id, 0, True, "r")
    assert halted is not None and isinstance(halted.data, dict)
    assert halted.data["mid_step"] is True and halted.data["step"] == 0
    assert isinstance(halted.data["halt_ms"], int | float) and halted.data["halt_ms"] >= 0
    assert await storage.events_after(running_id, halted.seq - 1) == [halted]
    records = await storage.step_records(running_id)
    assert [(r.step, r.outcome) for r in records] == [(0, "interrupted")]
    operation = await storage.get(running_id)
    assert operation is not None and operation.status is OperationStatus.INTERRUPTED
    for op_id in (running_id, pending_id):
        await gap_free(storage, op_id)


def test_parameters_are_read_from_the_sql() -> None:
    sql = PgSql(
        "SELECT :id, :step, :step::text, '{\"a\":' || :n || '}'", id="text", step="integer", n="int"
    )
    assert sql.names == ("id", "step", "n")
    assert sql.pyformat == "SELECT %(id)s, %(step)s, %(step)s::text, '{\"a\":' || %(n)s || '}'"
    assert sql.prepare.endswith(
        "(text, integer, int) AS SELECT $1, $2, $2::text, '{\"a\":' || $3 || '}'"
    )
    assert sql.execute.endswith("(%(id)s, %(step)s, %(n)s)")


def test_a_parameter_without_a_type_fails_where_the_statement_is_defined() -> None:
    with pytest.raises(ValueError, match=r"undeclared \['runner'\]"):
        PgSql("SELECT :id, :runner", id="text")
    with pytest.raises(ValueError, match=r"unused \['step'\]"):
        PgSql("SELECT :id", id="text", step="integer")


def test_a_parameter_left_unbound_fails_naming_it() -> None:
    with pytest.raises(KeyError, match="no value for runner"):
        Sql("SELECT :id, :runner").check({"id": "x"})


@pytest.mark.postgres
def test_each_write_to_one_operation_finds_it_by_primary_key_in_a_generic_plan(
    postgres_url: str,
) -> None:
    # A prepared statement's generic plan is made once per connection, often while the table
    # is new and unanalyzed; then an index on status looked as good as the primary key, and a
    # plan that used it scanned every running operation on every write, for as long as the
    # connection lived.
    engine = create_db_engine(postgres_url)
    upgrade_to_head(engine)
    writes = {
        name: statement
        for name, statement in vars(postgres_sql).items()
        if isinstance(statement, PgSql)
        and re.search(r"UPDATE operations SET[^;]*?WHERE id = :id", statement.text)
    }
    assert {"APPEND", "ADVANCE", "HALT", "RECORD_STOP", "RELEASE", "CLAIM_AND_START"} <= set(writes)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        for name, statement in writes.items():
            cursor.execute(statement.prepare)
            nulls = ", ".join("NULL" for _ in statement.names)
            cursor.execute(f"EXPLAIN {statement.execute.split('(')[0]}({nulls})")
            plan = "\n".join(row[0] for row in cursor.fetchall())
            on_operations = [
                line for line in plan.splitlines() if "Scan" in line and " on operations" in line
            ]
            assert on_operations, (name, plan)
            assert all("pk_operations" in line for line in on_operations), (name, plan)
        raw.rollback()
    finally:
        raw.close()
        engine.dispose()


@pytest.mark.postgres
async def test_writes_spread_over_the_batchers_keep_each_operations_order(
    postgres_url: str,
) -> None:
    storage = await opened_storage(postgres_url)
    assert isinstance(storage, PostgresStorage) and len(storage.batchers) == 2
    try:
        ops = [await running(storage) for _ in range(8)]
        while len({id(storage.batcher_for(op)) for op in ops}) < 2 and len(ops) < 64:
            ops.append(await running(storage))  # ids are random: until both batchers have some
        assert {id(storage.batcher_for(op)) for op in ops} == {id(b) for b in storage.batchers}

        async def chunks(op_id: str) -> None:
            for n in range(5):
                await storage.chunk(op_id, 0, f"{op_id} {n}", "r", False)

        # All at once: each batcher batches what queues behind it, concurrently with the other.
        await asyncio.gather(*(chunks(op) for op in ops))
        for op in ops:
            await gap_free(storage, op)
            texts = [
                e.data["text"]
                for e in await storage.events_after(op, 0)
                if e.kind is EventKind.OUTPUT_CHUNK
            ]
            assert texts == [f"{op} {n}" for n in range(5)]
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_handing_back_leases_locks_rows_in_id_order_as_a_batch_does(
    pg_storage: PostgresStorage,
) -> None:
    """A runtime shutting down hands its leases back while a batch of writes its cancelled
    runs left behind may still be in flight; batches lock their rows in id order, so the hand-
    back must too. In the order it scanned them it deadlocked with such a batch under load
    (bench.stop_under_load on PostgreSQL, at shutdown: "could not hand back leases"), and the
    operations then waited for their leases to lapse."""
    storage = pg_storage
    first, second = await running(storage), await running(storage)
    while first < second:  # created first (first in the table), but second in id order
        first, second = second, await running(storage)
    locker = storage.engine.connect()
    transaction = locker.begin()
    lock = text("SELECT 1 FROM operations WHERE id = :id FOR UPDATE")
    # As a batch over both does: the lower id first.
    await asyncio.to_thread(locker.execute, lock, {"id": second})
    try:
        dropping = asyncio.ensure_future(storage.drop_leases("r"))

        async def waiting_for_a_lock() -> bool:
            with storage.engine.connect() as conn:
                waits = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                ).scalar_one()
            return bool(waits)

        await eventually(waiting_for_a_lock)
        # The batch goes on to its higher id: the hand-back must not hold it.
        await asyncio.to_thread(locker.execute, lock, {"id": first})
        await asyncio.to_thread(transaction.commit)
        assert await dropping >= 2
    finally:
        await asyncio.to_thread(locker.close)
