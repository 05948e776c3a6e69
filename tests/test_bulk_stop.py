"""Bulk stop (issue 14, item 5), on both backends: StopOperations stops exactly the caller's
unfinished operations that match its filter, each with the bulk cause, and never another
principal's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc
import pytest
from grpc import aio

from gateway_service.server import start_gateway
from runtime_service.app import RuntimeApp
from runtime_service.domain import EventKind, OperationStatus, StopCause
from runtime_service.server import RunningRuntime, start_runtime
from stopline.errors import InvalidArgument
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import operation_pb2 as op_pb
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config
from tests.credentials import OTHER_TOKEN, TOKEN, gateway_channel
from tests.test_gateway import TICKER_30S, kind, read_until, start_request
from tests.test_gateway import gateway_config as gateway_settings

Stub = Any  # the generated stubs type sync calls; these are aio ones
BULK = ("runtime", "bulk stop")


@pytest.fixture
async def runtime_on(db_url: str) -> AsyncIterator[RunningRuntime]:
    running = await start_runtime(runtime_config(db_url), registry())
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def stubs(runtime_on: RunningRuntime) -> AsyncIterator[tuple[Stub, Stub]]:
    gateway = await start_gateway(gateway_settings(runtime_on.address))
    try:
        async with (
            gateway_channel(gateway.address, TOKEN) as mine,
            gateway_channel(gateway.address, OTHER_TOKEN) as theirs,
        ):
            yield pb_grpc.GatewayServiceStub(mine), pb_grpc.GatewayServiceStub(theirs)
    finally:
        await gateway.stop(grace=0)


async def started(stub: Stub, agent: str) -> tuple[Any, str]:
    """A running operation's stream (left open) and its id."""
    call = stub.StartAndStream(start_request(agent, TICKER_30S))
    updates = await read_until(call, lambda u: kind(u) == "event:step_started")
    return call, updates[0].accepted.operation_id


async def status(stub: Stub, op_id: str) -> Any:
    return (await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))).operation


async def test_bulk_stop_stops_exactly_the_callers_matching_operations(
    stubs: tuple[Stub, Stub],
) -> None:
    mine, theirs = stubs
    my_tickers = [await started(mine, "ticker") for _ in range(2)]
    my_gated = await started(mine, "gated")
    their_ticker = await started(theirs, "ticker")
    try:
        answer = await mine.StopOperations(pb.StopOperationsRequest(agent="ticker"))
        assert answer.stopped == 2 and not answer.limit_reached
        assert sorted(answer.operation_ids) == sorted(op_id for _, op_id in my_tickers)
        for call, _ in my_tickers:
            updates = await read_until(call, lambda u: kind(u) == "event:interrupted")
            events = [u.event for u in updates if u.WhichOneof("update") == "event"]
            stop = next(e.stop_requested for e in events if e.HasField("stop_requested"))
            assert (stop.requested_by, stop.reason) == BULK
            assert stop.cause == op_pb.STOP_CAUSE_BULK
            assert events[-1].interrupted.mid_step
            assert events[-1].interrupted.cause == op_pb.STOP_CAUSE_BULK
        for stub, (_, op_id) in ((mine, my_gated), (theirs, their_ticker)):
            untouched = await status(stub, op_id)
            assert untouched.status == op_pb.OPERATION_STATUS_RUNNING
            assert not untouched.HasField("stop_request")

        # The other principal's own bulk stop reaches only theirs; mine is left running.
        answer = await theirs.StopOperations(pb.StopOperationsRequest())
        assert list(answer.operation_ids) == [their_ticker[1]]
        assert (await status(mine, my_gated[1])).status == op_pb.OPERATION_STATUS_RUNNING
        # Nothing of theirs left unfinished: a second call stops nothing.
        assert (await theirs.StopOperations(pb.StopOperationsRequest())).stopped == 0
    finally:
        for call, _ in [*my_tickers, my_gated, their_ticker]:
            call.cancel()


async def test_a_bulk_stop_status_other_than_pending_or_running_is_invalid(
    stubs: tuple[Stub, Stub],
) -> None:
    mine, _ = stubs
    request = pb.StopOperationsRequest(status=op_pb.OPERATION_STATUS_COMPLETED)
    with pytest.raises(aio.AioRpcError) as caught:
        await mine.StopOperations(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("status:")


async def test_bulk_stop_filters_by_status_and_labels(db_url: str) -> None:
    gated = GatedAgent()
    app = await RuntimeApp.open(runtime_config(db_url), registry(gated))
    ops = app.operations
    try:
        running_a = (await ops.start("gated", {}, "", {"team": "a"}, owner="alice")).operation.id
        running_b = (await ops.start("gated", {}, "", {"team": "b"}, owner="alice")).operation.id
        held_a = await ops.start("gated", {}, "", {"team": "a"}, hold_seconds=60, owner="alice")
        bobs = (await ops.start("gated", {}, "", {"team": "a"}, owner="bob")).operation.id
        for op_id in (running_a, running_b, bobs):
            await eventually(partial(_running, app, op_id))

        only_pending = await ops.stop_matching("alice", "PENDING", "", {"team": "a"})
        assert only_pending.operation_ids == (held_a.operation.id,)
        held = await ops.get(held_a.operation.id)
        assert held.status is OperationStatus.INTERRUPTED and held.stop is not None
        assert (held.stop.requested_by, held.stop.reason) == BULK
        assert held.stop.cause is StopCause.BULK

        team_a = await ops.stop_matching("alice", None, "", {"team": "a"})
        assert team_a.operation_ids == (running_a,)
        await asyncio.wait_for(app.runner.wait_finished(running_a), 10)
        events = await app.storage.events_after(running_a, 0)
        kinds = [e.kind for e in events]
        assert kinds.index(EventKind.STOP_REQUESTED) < kinds.index(EventKind.INTERRUPTED)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        for untouched in (running_b, bobs):
            assert (await ops.get(untouched)).stop is None

        with pytest.raises(InvalidArgument, match="status"):
            await ops.stop_matching("alice", "COMPLETED", "", {})
    finally:
        await app.close()


async def _running(app: RuntimeApp, op_id: str) -> bool:
    return (await app.operations.get(op_id)).status is OperationStatus.RUNNING


async def test_bulk_stop_says_when_it_reached_its_limit(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime_service import operations as operations_module

    monkeypatch.setattr(operations_module, "BULK_STOP_LIMIT", 2)
    monkeypatch.setattr(operations_module, "BULK_PAGE", 1)  # and pages through
    app = await RuntimeApp.open(runtime_config(db_url), registry())
    try:
        for _ in range(3):
            await app.operations.start("gated", {}, "", hold_seconds=60, owner="alice")
        first = await app.operations.stop_matching("alice", None, "", {})
        assert len(first.operation_ids) == 2 and first.limit_reached
        rest = await app.operations.stop_matching("alice", None, "", {})
        assert len(rest.operation_ids) == 1 and not rest.limit_reached
    finally:
        await app.close()
