"""Several runtime replicas as separate OS processes on one PostgreSQL database.

Replicas run with short leases (1.5 s) so that takeovers happen quickly. Tests that stop or cut
off PostgreSQL use a private cluster (tests/pg_cluster.py), never the shared server.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc import aio
from sqlalchemy import create_engine, select

from runtime_service.schema import events as events_table
from runtime_service.schema import operations as operations_table
from runtime_service.schema import steps as steps_table
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import runtime_channel
from tests.pg_cluster import PrivatePostgres, private_postgres, require_private_postgres
from tests.processes import RuntimeProcess

if TYPE_CHECKING:
    Stub = rt_grpc.RuntimeServiceAsyncStub

pytestmark = pytest.mark.postgres
REPLICA_ARGS = ("--lease-seconds", "1.5", "--poll-seconds", "0.2")
TERMINAL = ("COMPLETED", "FAILED", "INTERRUPTED")
StartReplicas = Callable[..., list[RuntimeProcess]]


@pytest.fixture
def start_replicas(tmp_path: Path) -> Iterator[StartReplicas]:
    started: list[RuntimeProcess] = []

    def start(url: str, count: int, *extra: str) -> list[RuntimeProcess]:
        new = [
            RuntimeProcess(url, tmp_path, extra_args=(*REPLICA_ARGS, *extra)) for _ in range(count)
        ]
        started.extend(new)
        return new

    yield start
    for process in started:
        process.close()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    require_private_postgres()
    with private_postgres() as pg:
        yield pg


async def channel_stubs(replicas: list[RuntimeProcess]) -> tuple[list[aio.Channel], list[Stub]]:
    channels = [runtime_channel(r.address) for r in replicas]
    return channels, [rt_grpc.RuntimeServiceStub(c) for c in channels]


def ticker(**settings: float) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(settings)
    return value


async def start_op(stub: Stub, **settings: float) -> str:
    response = await stub.StartOperation(
        pb.StartOperationRequest(agent="ticker", input=ticker(**settings))
    )
    return str(response.operation.id)


async def watch(stub: Stub, op_id: str, after_seq: int = 0) -> AsyncIterator[op_pb.Event]:
    async for response in stub.WatchOperation(
        pb.WatchOperationRequest(operation_id=op_id, after_seq=after_seq)
    ):
        yield response.event


def step_rows(url: str, op_id: str | None = None) -> list[Any]:
    engine = create_engine(url)
    try:
        query = select(steps_table).order_by(steps_table.c.operation_id, steps_table.c.started_at)
        if op_id is not None:
            query = query.where(steps_table.c.operation_id == op_id)
        with engine.connect() as conn:
            return list(conn.execute(query))
    finally:
        engine.dispose()


def owner_index(replicas: list[RuntimeProcess], runner_id: str) -> int:
    """Runner ids are host-pid-suffix: find which replica process a step ran on."""
    pid = int(runner_id.split("-")[-2])
    return next(i for i, r in enumerate(replicas) if r.process.pid == pid)


def assert_never_ran_twice_at_once(rows: list[Any]) -> None:
    """From the stored step records: per operation, no attempt started before the previous one
    ended. An abandoned attempt (its replica died or lost the database) ends when the next
    claim takes the operation over, after its lease lapsed, which the crash test checks against
    the moment of the kill."""
    by_op: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_op[row.operation_id].append(row)
    for op_id, attempts in by_op.items():
        for earlier, later in itertools.pairwise(attempts):
            if earlier.finished_at is not None:
                assert earlier.finished_at <= later.started_at, f"{op_id}: overlapping attempts"


def assert_gap_free(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            last = dict(
                conn.execute(select(operations_table.c.id, operations_table.c.last_seq)).all()
            )
            seqs: dict[str, list[int]] = defaultdict(list)
            for op_id, seq in conn.execute(
                select(events_table.c.operation_id, events_table.c.seq).order_by(
                    events_table.c.operation_id, events_table.c.seq
                )
            ):
                seqs[op_id].append(seq)
        for op_id, last_seq in last.items():
            assert seqs[op_id] == list(range(1, last_seq + 1)), f"{op_id}: gap or repeat"
    finally:
        engine.dispose()


async def wait_all_terminal(stub: Stub, ids: list[str], deadline: float = 120) -> dict[str, int]:
    end = time.monotonic() + deadline
    statuses: dict[str, int] = {}
    while True:
        for op_id in ids:
            if op_id in statuses:
                continue
            try:
                operation = (
                    await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))
                ).operation
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                break  # the database is still coming back
            name = op_pb.OperationStatus.Name(operation.status).removeprefix("OPERATION_STATUS_")
            if name in TERMINAL:
                statuses[op_id] = operation.status
        if len(statuses) == len(ids):
            return statuses
        assert time.monotonic() < end, f"{len(ids) - len(statuses)} operations never finished"
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------ cross-replica stop


async def test_stop_sent_to_one_replica_halts_the_step_running_on_another(
    postgres_url: str, start_replicas: StartReplicas
) -> None:
    replicas = start_replicas(postgres_url, 2)
    channels, stubs = await channel_stubs(replicas)
    try:
        op_id = await start_op(stubs[0], steps=2, step_seconds=30, chunk_interval_seconds=5)
        watched: list[op_pb.Event] = []
        live = watch(stubs[1], op_id)  # a live watch across replicas, too
        async for event in live:
            watched.append(event)
            if event.WhichOneof("kind") == "output_chunk":
                break
        owner = owner_index(replicas, step_rows(postgres_url, op_id)[0].runner_id)
        other = 1 - owner
        began = time.monotonic()
        reply = await stubs[other].InterruptOperation(
            pb.InterruptOperationRequest(operation_id=op_id, requested_by="test")
        )
        assert reply.outcome == pb.INTERRUPT_OUTCOME_ACCEPTED
        async for event in live:
            watched.append(event)
        elapsed = time.monotonic() - began
        final = watched[-1]
        assert final.WhichOneof("kind") == "interrupted" and final.interrupted.mid_step
        assert elapsed < 10, "the stop waited for the 30-second step"
        rows = step_rows(postgres_url, op_id)
        assert [(r.step, r.outcome) for r in rows] == [(0, "interrupted")]
        assert owner_index(replicas, rows[0].runner_id) == owner  # halted where it ran
        assert [e.seq for e in watched] == list(range(1, final.seq + 1))
    finally:
        for channel in channels:
            await channel.close(grace=None)


# ------------------------------------------------------------------------ crash recovery


async def test_killed_replica_work_completes_on_another_with_a_gap_free_stream(
    postgres_url: str, start_replicas: StartReplicas
) -> None:
    replicas = start_replicas(postgres_url, 2)
    channels, stubs = await channel_stubs(replicas)
    try:
        op_id = await start_op(stubs[0], steps=4, step_seconds=1, chunk_interval_seconds=0.25)
        seen: list[op_pb.Event] = []
        async for event in watch(stubs[0], op_id):
            seen.append(event)
            if event.WhichOneof("kind") == "step_started" and event.step_started.step == 1:
                break
        owner = owner_index(replicas, step_rows(postgres_url, op_id)[0].runner_id)
        survivor = 1 - owner
        killed_at = datetime.now(UTC)
        replicas[owner].kill()

        # The client reconnects (to the survivor) with the last seq it saw.
        rest = [e async for e in watch(stubs[survivor], op_id, seen[-1].seq)]
        seqs = [e.seq for e in seen + rest]
        assert seqs == list(range(1, len(seqs) + 1)), "gap or duplicate across the crash"
        assert rest[-1].WhichOneof("kind") == "completed"
        resumed = next(e for e in rest if e.WhichOneof("kind") == "started")
        assert resumed.started.resumed and resumed.started.from_step == 1
        rows = step_rows(postgres_url, op_id)
        assert all(r.finished_at is not None for r in rows)
        lost = [r for r in rows if r.outcome == "abandoned"]
        assert [(r.step, owner_index(replicas, r.runner_id)) for r in lost] == [(1, owner)]
        retried = [r for r in rows if r.step == 1 and r.attempt == 2]
        assert owner_index(replicas, retried[0].runner_id) == survivor
        assert retried[0].started_at > killed_at
        # Settled by the survivor's takeover, before its own attempt began.
        assert killed_at < lost[0].finished_at <= retried[0].started_at
        assert [r.step for r in rows if r.outcome == "completed"] == [0, 1, 2, 3]
        assert_never_ran_twice_at_once(rows)
    finally:
        for channel in channels:
            await channel.close(grace=None)


async def test_stop_requested_while_the_owner_is_dead_ends_it_without_resuming(
    postgres_url: str, start_replicas: StartReplicas
) -> None:
    replicas = start_replicas(postgres_url, 2)
    channels, stubs = await channel_stubs(replicas)
    try:
        op_id = await start_op(stubs[0], steps=3, step_seconds=30)
        async for event in watch(stubs[0], op_id):
            if event.WhichOneof("kind") == "output_chunk":
                break
        owner = owner_index(replicas, step_rows(postgres_url, op_id)[0].runner_id)
        replicas[owner].kill()
        survivor = stubs[1 - owner]
        await survivor.InterruptOperation(pb.InterruptOperationRequest(operation_id=op_id))
        events = [e async for e in watch(survivor, op_id)]
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds[-1] == "interrupted" and kinds.count("started") == 1  # never resumed
        # The kill cut step 0, whose step_started and output are in the stream: the halt says so.
        halted = events[-1].interrupted
        assert halted.mid_step and halted.step == 0
        rows = step_rows(postgres_url, op_id)
        assert [(r.step, r.attempt, r.outcome) for r in rows] == [(0, 1, "abandoned")]
        assert rows[0].finished_at is not None
    finally:
        for channel in channels:
            await channel.close(grace=None)


# ------------------------------------------------------------------------ many operations


async def test_five_hundred_operations_on_three_replicas_with_random_stops(
    postgres_url: str, start_replicas: StartReplicas
) -> None:
    replicas = start_replicas(postgres_url, 3, "--lease-seconds", "5")
    channels, stubs = await channel_stubs(replicas)
    rng = random.Random(4)
    limit = asyncio.Semaphore(40)
    stops: dict[str, int] = {}

    async def one(i: int) -> str:
        async with limit:
            op_id = await start_op(
                stubs[i % 3], steps=2, step_seconds=0.01, chunk_interval_seconds=0.01
            )
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.04))
            reply = await stubs[rng.randrange(3)].InterruptOperation(
                pb.InterruptOperationRequest(operation_id=op_id, requested_by="chaos")
            )
            stops[op_id] = reply.outcome
        return op_id

    try:
        ids = await asyncio.gather(*(one(i) for i in range(500)))
        statuses = await wait_all_terminal(stubs[0], list(ids))
        wrong = []
        for op_id in ids:
            expected = op_pb.OPERATION_STATUS_COMPLETED
            if stops.get(op_id) in (
                pb.INTERRUPT_OUTCOME_ACCEPTED,
                pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED,
            ):
                expected = op_pb.OPERATION_STATUS_INTERRUPTED
            if statuses[op_id] != expected:
                wrong.append((op_id, stops.get(op_id), statuses[op_id]))
        assert wrong == []
        assert sum(1 for s in statuses.values() if s == op_pb.OPERATION_STATUS_INTERRUPTED) > 50
        rows = step_rows(postgres_url)
        assert all(r.finished_at is not None for r in rows)  # nobody crashed: every attempt ended
        assert_never_ran_twice_at_once(rows)
        assert len({r.runner_id for r in rows}) == 3  # the work really was shared
        assert_gap_free(postgres_url)
    finally:
        for channel in channels:
            await channel.close(grace=None)


# ------------------------------------------------------------------------ database faults


async def _run_through_database_fault(
    pg: PrivatePostgres, start_replicas: StartReplicas, fault: Callable[[Stub], Any]
) -> None:
    url = pg.create_database("stopline")
    replicas = start_replicas(url, 2)
    channels, stubs = await channel_stubs(replicas)
    try:
        ids = [
            await start_op(stubs[i % 2], steps=5, step_seconds=0.3, chunk_interval_seconds=0.1)
            for i in range(8)
        ]
        async for event in watch(stubs[0], ids[-1]):
            if event.WhichOneof("kind") == "step_completed":
                break
        await fault(stubs[0])
        statuses = await wait_all_terminal(stubs[1], ids, deadline=90)
        assert set(statuses.values()) == {op_pb.OPERATION_STATUS_COMPLETED}
        rows = step_rows(url)
        assert_never_ran_twice_at_once(rows)
        assert sorted(r.step for r in rows if r.outcome == "completed") == sorted(
            list(range(5)) * 8
        )
        assert_gap_free(url)
    finally:
        for channel in channels:
            await channel.close(grace=None)


async def test_postgres_down_answers_unavailable_and_work_resumes_when_it_returns(
    private_pg: PrivatePostgres, start_replicas: StartReplicas
) -> None:
    async def outage(stub: Stub) -> None:
        private_pg.stop()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ListOperations(pb.ListOperationsRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(aio.AioRpcError) as err:
            await stub.StartOperation(pb.StartOperationRequest(agent="echo"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        private_pg.start()

    await _run_through_database_fault(private_pg, start_replicas, outage)


async def test_runs_finish_after_postgres_restarts_mid_run(
    private_pg: PrivatePostgres, start_replicas: StartReplicas
) -> None:
    async def restart(stub: Stub) -> None:
        private_pg.restart()

    await _run_through_database_fault(private_pg, start_replicas, restart)


async def test_runs_finish_after_every_connection_is_cut(
    private_pg: PrivatePostgres, start_replicas: StartReplicas
) -> None:
    async def cut(stub: Stub) -> None:
        assert private_pg.cut_connections() > 0

    await _run_through_database_fault(private_pg, start_replicas, cut)
