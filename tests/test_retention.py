"""Retention: the events and step records of operations that ended before the cutoff are deleted
in batches, on one replica at a time; operation rows stay; running operations are never touched;
a watch of expired events says so."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from gateway_service.server import start_gateway
from runtime_service import watching as watching_module
from runtime_service.app import RuntimeApp
from runtime_service.config import parse_retention, shown_duration
from runtime_service.domain import Event, EventKind, Operation, OperationStatus
from runtime_service.metrics import RetentionMetrics
from runtime_service.retention import RetentionSweeper
from runtime_service.schema import event_purges
from runtime_service.server import start_runtime
from runtime_service.storage import Storage, utcnow
from stopline.errors import FailedPrecondition
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.transport import TOKEN_ENV
from stopline.v1 import operation_pb2 as op_pb
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, opened_storage, runtime_config
from tests.credentials import TOKEN, gateway_channel
from tests.test_gateway import gateway_config
from tests.test_metrics import ANY_PORT, scrape, value

HOUR = 3600.0


@pytest.fixture
async def quiet_app(db_url: str, gated: GatedAgent) -> AsyncIterator[RuntimeApp]:
    """The runtime's core with its own retention off: each test sweeps when it chooses."""
    app = await RuntimeApp.open(runtime_config(db_url, event_retention_seconds=0), registry(gated))
    try:
        yield app
    finally:
        await app.close()


def sweeper(storage: Storage, retention: float = HOUR, batch_size: int = 500) -> RetentionSweeper:
    return RetentionSweeper(
        storage, retention, batch_size, 60.0, RetentionMetrics(CollectorRegistry())
    )


async def finished(app: RuntimeApp, agent: str, input_value: dict[str, Any]) -> Operation:
    created = await app.operations.start(agent, input_value, "")
    op_id = created.operation.id

    async def done() -> Operation | None:
        operation = await app.operations.get(op_id)
        return operation if operation.status.is_terminal else None

    return await eventually(done)


async def all_events(storage: Storage, op_id: str) -> list[Event]:
    return await storage.events_after(op_id, 0, 100_000)


def gap_free(events: list[Event], last_seq: int) -> bool:
    return [e.seq for e in events] == list(range(1, last_seq + 1))


# ------------------------------------------------------------------------ settings


def test_retention_durations_parse_and_show() -> None:
    assert parse_retention("7d") == 7 * 86400
    assert parse_retention("12h") == 12 * 3600
    assert parse_retention(" 30m ") == 1800
    assert parse_retention("90") == 90
    assert parse_retention("0") == 0
    assert parse_retention("1w") == 7 * 86400
    with pytest.raises(ValueError, match="7d, 12h"):
        parse_retention("7 days")
    assert shown_duration(7 * 86400) == "7d"
    assert shown_duration(90) == "90s"


# ------------------------------------------------------------------------ what is deleted


async def test_only_operations_ended_before_the_cutoff_lose_their_events(
    quiet_app: RuntimeApp, gated: GatedAgent
) -> None:
    storage = quiet_app.storage
    old = await finished(quiet_app, "ticker", {"steps": 3, "step_seconds": 0})
    failed = await finished(quiet_app, "ticker", {"steps": 3, "step_seconds": 0, "fail_at_step": 1})
    cutoff = utcnow()
    recent = await finished(quiet_app, "echo", {"x": 1})
    running = (await quiet_app.operations.start("gated", {"steps": 3}, "")).operation
    await eventually(lambda: _status_is(quiet_app, running.id, OperationStatus.RUNNING))
    # Its step's chunk, written after it is RUNNING: the events kept are all it writes (the
    # step then waits on its gate).
    await eventually(lambda: _emitted(storage, running.id))
    pending = (await quiet_app.operations.start("echo", {}, "", hold_seconds=60)).operation
    kept = {op.id: await all_events(storage, op.id) for op in (recent, running, pending)}
    assert len(await storage.step_records(old.id)) == 3

    s = sweeper(storage)
    totals = await s.sweep(now=cutoff + timedelta(seconds=HOUR))
    assert totals is not None and totals.operations == 2

    for op in (old, failed):
        assert await all_events(storage, op.id) == []
        assert await storage.step_records(op.id) == []
        after = await storage.get(op.id)
        assert after is not None and after.events_expired_at is not None
        # The row stays: status, result, error, last seq.
        assert (after.status, after.result, after.error, after.last_seq) == (
            op.status,
            op.result,
            op.error,
            op.last_seq,
        )
    assert totals.events == old.last_seq + failed.last_seq
    for op_id, events in kept.items():
        assert await all_events(storage, op_id) == events
        still = await storage.get(op_id)
        assert still is not None and still.events_expired_at is None

    # Much later: the recent one goes too; what has not ended is still never touched.
    later = await s.sweep(now=utcnow() + timedelta(days=365))
    assert later is not None and later.operations == 1
    assert await all_events(storage, recent.id) == []
    for op in (running, pending):
        assert await all_events(storage, op.id) == kept[op.id]
    assert len(await storage.step_records(running.id)) == 1
    # Counted: every deleted event, once.
    assert s.metrics.events._value.get() == totals.events + later.events
    assert s.metrics.operations._value.get() == 3
    gated.open(running.id)


async def _status_is(app: RuntimeApp, op_id: str, status: OperationStatus) -> bool:
    return (await app.operations.get(op_id)).status is status


async def test_deletion_runs_in_batches_no_bigger_than_the_batch_size(
    quiet_app: RuntimeApp,
) -> None:
    storage = quiet_app.storage
    ops = [await finished(quiet_app, "ticker", {"steps": 6, "step_seconds": 0}) for _ in range(3)]
    rows = sum(op.last_seq for op in ops) + 3 * 6
    cutoff = utcnow() + timedelta(seconds=1)
    batches = []
    while True:
        batch = await storage.expire_events(cutoff, 7)
        if batch.empty:
            break
        assert batch.events + batch.steps <= 7
        batches.append(batch)
    assert len(batches) > rows // 7
    assert sum(b.events + b.steps for b in batches) == rows
    assert sum(b.operations for b in batches) == 3
    for op in ops:
        assert await all_events(storage, op.id) == []
        assert await storage.step_records(op.id) == []
    # The deletion queue is empty again.
    with storage.engine.connect() as conn:  # type: ignore[attr-defined]
        assert conn.execute(select(func.count()).select_from(event_purges)).scalar_one() == 0


async def test_retention_zero_keeps_everything(quiet_app: RuntimeApp) -> None:
    op = await finished(quiet_app, "echo", {})
    s = sweeper(quiet_app.storage, retention=0)
    assert not s.enabled
    assert await s.sweep(now=utcnow() + timedelta(days=3650)) is None
    s.start()  # no task: nothing is ever swept
    await s.close()
    assert gap_free(await all_events(quiet_app.storage, op.id), op.last_seq)
    assert quiet_app.retention is not None and not quiet_app.retention.enabled


async def test_operations_running_while_retention_deletes_keep_every_event(
    quiet_app: RuntimeApp, gated: GatedAgent
) -> None:
    """Batches of deletion interleave with the steps of running operations (gated, so the
    interleaving is certain, and tickers streaming freely); every running operation ends with its
    whole, gap-free event sequence and every step record, seen live by a watcher too."""
    storage = quiet_app.storage
    old = [await finished(quiet_app, "ticker", {"steps": 4, "step_seconds": 0}) for _ in range(8)]
    cutoff = utcnow()
    gated_ops = [
        (await quiet_app.operations.start("gated", {"steps": 5}, "")).operation for _ in range(3)
    ]
    tickers = [
        (
            await quiet_app.operations.start(
                "ticker", {"steps": 4, "step_seconds": 0.05, "chunk_interval_seconds": 0.005}, ""
            )
        ).operation
        for _ in range(3)
    ]
    live: dict[str, list[Event]] = {}

    async def watch(op_id: str) -> None:
        live[op_id] = [e async for e in quiet_app.operations.watch(op_id, 0)]

    watchers = [asyncio.create_task(watch(op.id)) for op in [*gated_ops, *tickers]]
    batches_while_running = 0
    async with storage.retention_turn() as mine:
        assert mine
        while True:
            batch = await storage.expire_events(cutoff, 5)
            states = [await storage.get(op.id) for op in gated_ops]
            if any(s is not None and s.status is OperationStatus.RUNNING for s in states):
                batches_while_running += not batch.empty
            for op in gated_ops:
                gated.release(op.id)
            if batch.empty:
                break
    for op in gated_ops:
        gated.open(op.id)
    await asyncio.wait_for(asyncio.gather(*watchers), 30)
    assert batches_while_running >= 5

    for op in old:
        assert await all_events(storage, op.id) == []
    for op in [*gated_ops, *tickers]:
        final = await storage.get(op.id)
        assert final is not None and final.status is OperationStatus.COMPLETED
        assert final.events_expired_at is None
        stored = await all_events(storage, op.id)
        assert gap_free(stored, final.last_seq) and stored[-1].is_terminal
        assert [e.seq for e in live[op.id]] == [e.seq for e in stored]
        records = await storage.step_records(op.id)
        assert [r.step for r in records] == list(range(final.steps_completed))


# ------------------------------------------------------------------------ one replica at a time


@pytest.mark.postgres
async def test_only_one_replica_holds_the_retention_turn(postgres_url: str) -> None:
    first = await opened_storage(postgres_url)
    second = await opened_storage(postgres_url)
    try:
        s = sweeper(second)
        async with first.retention_turn() as first_mine:
            assert first_mine
            async with second.retention_turn() as second_mine:
                assert not second_mine
            # The other replica's sweep skips its turn: it deletes nothing.
            assert await s.sweep(now=utcnow() + timedelta(days=365)) is None
            assert s.metrics.sweeps.labels("skipped")._value.get() == 1
        # Given back: now the other one may.
        async with second.retention_turn() as second_mine:
            assert second_mine
            async with first.retention_turn() as first_mine:
                assert not first_mine
        assert await s.sweep(now=utcnow()) is not None
    finally:
        await first.close()
        await second.close()


async def test_a_sqlite_database_has_one_replica(sqlite_url: str) -> None:
    storage = await opened_storage(sqlite_url)
    try:
        async with storage.retention_turn() as mine:
            assert mine
    finally:
        await storage.close()


# ------------------------------------------------------------------------ watching expired events


async def test_a_watch_of_expired_events_says_they_expired(quiet_app: RuntimeApp) -> None:
    op = await finished(quiet_app, "ticker", {"steps": 2, "step_seconds": 0})
    await sweeper(quiet_app.storage).sweep(now=utcnow() + timedelta(days=1))
    with pytest.raises(FailedPrecondition) as raised:
        async for _ in quiet_app.operations.watch(op.id, 0):
            pass
    message = str(raised.value)
    assert op.id in message and "COMPLETED" in message and "expired at" in message
    # From the last seq there is nothing to send: the watch ends at once, as before expiry.
    assert [e async for e in quiet_app.operations.watch(op.id, op.last_seq)] == []
    assert (await quiet_app.operations.get(op.id)).status is OperationStatus.COMPLETED


async def test_a_replay_cut_short_by_retention_says_the_events_expired(
    quiet_app: RuntimeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watching_module, "REPLAY_BATCH", 2)
    op = await finished(quiet_app, "ticker", {"steps": 3, "step_seconds": 0})
    batches = quiet_app.operations.watch_batches(op.id, 0)
    async with contextlib.aclosing(batches):
        first = await anext(batches)
        assert [e.seq for e in first] == [1, 2]
        await sweeper(quiet_app.storage).sweep(now=utcnow() + timedelta(days=1))
        with pytest.raises(FailedPrecondition, match="expired"):
            await anext(batches)


async def test_a_stream_through_the_gateway_of_expired_events_fails_precondition(
    sqlite_url: str,
) -> None:
    runtime = await start_runtime(runtime_config(sqlite_url, metrics_address=ANY_PORT), registry())
    gateway = await start_gateway(gateway_config(runtime.address))
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            request = pb.StartAndStreamRequest(agent="echo")
            updates = [u async for u in client.StartAndStream(request)]
            op_id = updates[0].accepted.operation_id
            last_seq = updates[-1].event.seq
            assert runtime.app.retention is not None  # the default, 7 days
            swept = await runtime.app.retention.sweep(now=utcnow() + timedelta(days=8))
            assert swept is not None and swept.operations == 1
            samples = await scrape(runtime.metrics)
            assert value(samples, "stopline_runtime_retention_events_deleted_total") == last_seq
            assert value(samples, "stopline_runtime_retention_operations_expired_total") == 1
            steps_deleted = "stopline_runtime_retention_step_records_deleted_total"
            assert value(samples, steps_deleted) == 1

            stream = client.StreamOperation(pb.StreamOperationRequest(operation_id=op_id))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stream:
                    pass
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = raised.value.details() or ""
            assert op_id in details and "COMPLETED" in details and "expired" in details

            # Reconnecting at the last seq ends cleanly, as for any ended operation.
            again = client.StreamOperation(
                pb.StreamOperationRequest(operation_id=op_id, after_seq=last_seq)
            )
            assert [u async for u in again] == []
            shown = await client.GetOperation(pb.GetOperationRequest(operation_id=op_id))
            assert shown.operation.status == op_pb.OPERATION_STATUS_COMPLETED

        # `stopline attach` says the same, and where to look instead.
        async def attach(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "stopline_cli",
                "attach",
                op_id,
                "--gateway",
                gateway.address,
                *args,
                env={**os.environ, TOKEN_ENV: TOKEN},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(process.communicate(), 60)
            return await process.wait(), output.decode()

        code, output = await attach()
        assert code != 0
        assert "FAILED_PRECONDITION" in output and "expired" in output
        assert f"stopline show {op_id}" in output
        code, output = await attach("--after", str(last_seq))
        assert code == 0, output
    finally:
        await gateway.stop(grace=0)
        await runtime.stop(grace=0)


async def _emitted(storage: Storage, operation_id: str) -> bool:
    events = await all_events(storage, operation_id)
    return any(e.kind is EventKind.OUTPUT_CHUNK for e in events)
