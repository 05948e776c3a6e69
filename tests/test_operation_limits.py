"""Deadlines and step budgets (issue 14, item 4), on both backends: reaching one stops the
operation as a user's stop would (STOPPING, stop_requested, interrupted), with the runtime's
reason; through the gateway where a client sets them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from sqlalchemy import create_engine, select

from gateway_service.server import RunningGateway, start_gateway
from runtime_service.app import RuntimeApp
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.schema import operations as operations_table
from runtime_service.server import RunningRuntime, start_runtime
from runtime_service.storage import utcnow
from stopline.errors import InvalidArgument
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config
from tests.credentials import TOKEN, gateway_channel, runtime_channel
from tests.processes import RuntimeProcess
from tests.test_gateway import gateway_config, kind, read_until, start_request

Stub = Any  # the generated stubs type sync calls; these are aio ones
TICKER_30S = {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 5}


async def collect(app: RuntimeApp, op_id: str, timeout: float = 20) -> list[Event]:
    async def run() -> list[Event]:
        return [e async for e in app.operations.watch(op_id, 0)]

    return await asyncio.wait_for(run(), timeout)


@pytest.fixture
async def runtime_on(db_url: str) -> AsyncIterator[RunningRuntime]:
    config = runtime_config(db_url, max_deadline_seconds=3600.0, max_steps_cap=50)
    running = await start_runtime(config, registry())
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def gateway(runtime_on: RunningRuntime) -> AsyncIterator[Stub]:
    running: RunningGateway = await start_gateway(gateway_config(runtime_on.address))
    try:
        async with gateway_channel(running.address, TOKEN) as channel:
            yield pb_grpc.GatewayServiceStub(channel)
    finally:
        await running.stop(grace=0)


def limited(
    input_value: dict[str, Any], deadline: float | None = None, max_steps: int = 0
) -> pb.StartAndStreamRequest:
    request = start_request("ticker", input_value)
    if deadline is not None:
        request.deadline.CopyFrom(duration_pb2.Duration(nanos=int(deadline * 1e9)))
    request.max_steps = max_steps
    return request


def events_of(updates: list[Any]) -> list[op_pb.Event]:
    return [u.event for u in updates if u.WhichOneof("update") == "event"]


async def test_a_deadline_of_200_ms_halts_a_30_s_step_mid_step(
    gateway: Stub,
) -> None:
    call = gateway.StartAndStream(limited(TICKER_30S, deadline=0.2))
    updates = await read_until(call, lambda u: kind(u) == "event:interrupted")
    accepted = updates[0].accepted.operation
    assert accepted.HasField("deadline_time")
    deadline = accepted.deadline_time.ToDatetime() - accepted.create_time.ToDatetime()
    assert deadline.total_seconds() == pytest.approx(0.2)
    events = events_of(updates)
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.index("stop_requested") < kinds.index("interrupted")
    assert "step_completed" not in kinds  # well before the 30-s step could have ended
    stop = events[kinds.index("stop_requested")].stop_requested
    assert (stop.requested_by, stop.reason) == ("runtime", "deadline of 200 ms exceeded")
    assert stop.cause == op_pb.STOP_CAUSE_DEADLINE_EXCEEDED
    halted = events[-1].interrupted
    assert halted.mid_step and halted.step == 0
    assert halted.cause == op_pb.STOP_CAUSE_DEADLINE_EXCEEDED
    got = await gateway.GetOperation(pb.GetOperationRequest(operation_id=accepted.id))
    assert got.operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert got.operation.stop_request.reason == "deadline of 200 ms exceeded"


async def test_a_step_budget_of_3_ends_after_step_3(gateway: Stub) -> None:
    ticks = {"steps": 10, "step_seconds": 0.01, "chunk_interval_seconds": 0.01}
    call = gateway.StartAndStream(limited(ticks, max_steps=3))
    updates = await read_until(call, lambda u: kind(u).startswith("event:") and _terminal(u))
    events = events_of(updates)
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[-1] == "interrupted"
    assert [e.step_completed.step for e in events if e.HasField("step_completed")] == [0, 1, 2]
    assert [e.step_started.step for e in events if e.HasField("step_started")] == [0, 1, 2]
    stop = events[kinds.index("stop_requested")].stop_requested
    assert (stop.requested_by, stop.reason) == ("runtime", "step budget of 3 steps exhausted")
    assert stop.cause == op_pb.STOP_CAUSE_STEP_BUDGET
    halted = events[-1].interrupted
    assert halted.cause == op_pb.STOP_CAUSE_STEP_BUDGET
    assert not halted.mid_step and halted.step == 3  # at the boundary after step 3
    op_id = updates[0].accepted.operation_id
    got = await gateway.GetOperation(pb.GetOperationRequest(operation_id=op_id))
    assert got.operation.steps_completed == 3 and got.operation.max_steps == 3


def _terminal(update: Any) -> bool:
    return kind(update) in ("event:completed", "event:failed", "event:interrupted")


@pytest.mark.parametrize(
    ("request_fields", "named", "cap"),
    [({"deadline": 3601.0}, "deadline", "3600"), ({"max_steps": 51}, "max_steps", "50")],
)
async def test_a_limit_above_the_cap_is_invalid_argument(
    gateway: Stub, request_fields: dict[str, Any], named: str, cap: str
) -> None:
    request = start_request("ticker", TICKER_30S)
    if "deadline" in request_fields:
        request.deadline.CopyFrom(duration_pb2.Duration(seconds=int(request_fields["deadline"])))
    request.max_steps = request_fields.get("max_steps", 0)
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in gateway.StartAndStream(request):
            pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.details() or ""
    assert named in message and cap in message and "cap" in message


async def test_defaults_apply_when_a_start_sets_no_limit(db_url: str) -> None:
    gated = GatedAgent()
    config = runtime_config(db_url, default_deadline_seconds=600.0, default_max_steps=2)
    app = await RuntimeApp.open(config, registry(gated))
    try:
        op = (await app.operations.start("gated", {"steps": 5}, "")).operation
        assert op.max_steps == 2 and op.deadline_at is not None
        assert (op.deadline_at - op.created_at).total_seconds() == pytest.approx(600.0)
        gated.open(op.id)
        events = await collect(app, op.id)
        assert [e.data["step"] for e in events if e.kind is EventKind.STEP_COMPLETED] == [0, 1]
        assert events[-1].kind is EventKind.INTERRUPTED
        with pytest.raises(InvalidArgument, match="deadline"):
            await app.operations.start("gated", {}, "", deadline_seconds=0.0)
    finally:
        await app.close()


async def test_a_deadline_already_past_when_claimed_stops_at_once(db_url: str) -> None:
    """Held past its deadline, then released: the runner that claims it stops it at once."""
    gated = GatedAgent()
    app = await RuntimeApp.open(runtime_config(db_url), registry(gated))
    try:
        created = await app.operations.start(
            "gated", {}, "", hold_seconds=30, deadline_seconds=0.05
        )
        op_id = created.operation.id

        async def past() -> bool:
            deadline_at = created.operation.deadline_at
            return deadline_at is not None and utcnow() > deadline_at

        await eventually(past)
        await app.operations.release(op_id)
        events = await collect(app, op_id)  # the gate is never opened: only the stop ends it
        stop = next(e for e in events if e.kind is EventKind.STOP_REQUESTED)
        assert stop.data == {
            "requested_by": "runtime",
            "reason": "deadline of 50 ms exceeded",
            "cause": "DEADLINE_EXCEEDED",
        }
        assert events[-1].kind is EventKind.INTERRUPTED
        final = await app.operations.get(op_id)
        assert final.status is OperationStatus.INTERRUPTED
    finally:
        await app.close()


@pytest.mark.postgres
async def test_the_deadline_fires_on_the_replica_that_took_over(
    postgres_url: str, tmp_path: Path
) -> None:
    """The owner is killed mid-step; the survivor takes the operation over and, re-arming the
    deadline from the stored column, stops it mid-step when the deadline passes."""
    args = ("--lease-seconds", "1.5", "--poll-seconds", "0.2")
    replicas = [RuntimeProcess(postgres_url, tmp_path, extra_args=args) for _ in range(2)]
    channels = [runtime_channel(r.address) for r in replicas]
    stubs = [rt_grpc.RuntimeServiceStub(c) for c in channels]
    try:
        request = rt_pb.StartOperationRequest(
            agent="ticker", deadline=duration_pb2.Duration(seconds=8)
        )
        request.input.update({"steps": 1, "step_seconds": 30, "chunk_interval_seconds": 0.2})
        op_id = (await stubs[0].StartOperation(request)).operation.id
        watched = rt_pb.WatchOperationRequest(operation_id=op_id)
        async for response in stubs[0].WatchOperation(watched):
            if response.event.WhichOneof("kind") == "output_chunk":
                break
        got = await stubs[0].GetOperation(rt_pb.GetOperationRequest(operation_id=op_id))
        owner = next(
            i
            for i, r in enumerate(replicas)
            if f"-{r.process.pid}-" in _runner_of(postgres_url, op_id)
        )
        assert got.operation.HasField("deadline_time")
        replicas[owner].kill()
        survivor = stubs[1 - owner]

        async def run() -> list[op_pb.Event]:
            return [r.event async for r in survivor.WatchOperation(watched)]

        events = await asyncio.wait_for(run(), 30)
        kinds = [e.WhichOneof("kind") for e in events]
        resumed = [e.started for e in events if e.HasField("started") and e.started.resumed]
        assert resumed, kinds  # taken over before the deadline...
        assert (
            kinds.index("started", 3) < kinds.index("stop_requested") < kinds.index("interrupted")
        )
        stop = events[kinds.index("stop_requested")].stop_requested
        assert (stop.requested_by, stop.reason) == ("runtime", "deadline of 8000 ms exceeded")
        assert stop.cause == op_pb.STOP_CAUSE_DEADLINE_EXCEEDED
        assert events[-1].interrupted.mid_step  # ...and stopped mid-step by the new owner
        assert "step_completed" not in kinds
    finally:
        for channel in channels:
            await channel.close(grace=None)
        for replica in replicas:
            replica.close()


def _runner_of(url: str, op_id: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = select(operations_table.c.runner_id).where(operations_table.c.id == op_id)
            return str(conn.execute(query).scalar_one())
    finally:
        engine.dispose()
