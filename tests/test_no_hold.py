"""Starts with no hold (issue 14, item 2): `StartAndStreamRequest.no_hold` makes the gateway start
the operation unheld with the runtime's StartAndWatchOperation, whose first message is the
start's answer and whose later ones are the operation's events, on one stream: no release and no
separate watch. The runtime link goes through a fault proxy (tests/fault_proxy.py), which counts
the calls made and can break the stream mid-way; both backends where storage matters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio

from gateway_service.server import RunningGateway, start_gateway
from runtime_service.domain import OperationStatus, StopCause
from runtime_service.server import RunningRuntime, start_runtime
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config
from tests.credentials import gateway_channel, runtime_channel
from tests.fault_proxy import FaultProxy
from tests.test_gateway import (
    ended,
    gateway_config,
    is_terminal,
    kind,
    read_until,
    start_request,
)

if TYPE_CHECKING:
    Stub = pb_grpc.GatewayServiceAsyncStub

HELD_PATH = ("StartOperation", "ReleaseOperation")


@dataclass
class Setup:
    runtime: RunningRuntime
    proxy: FaultProxy
    gateway: RunningGateway
    client: Stub


@pytest.fixture
async def runtime(db_url: str, gated: GatedAgent) -> AsyncIterator[RunningRuntime]:
    running = await start_runtime(runtime_config(db_url), registry(gated))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def setup(runtime: RunningRuntime) -> AsyncIterator[Setup]:
    async with FaultProxy(runtime.address) as proxy:
        gateway = await start_gateway(gateway_config(proxy.address, stop_ack_seconds=10))
        try:
            async with gateway_channel(gateway.address) as channel:
                yield Setup(runtime, proxy, gateway, pb_grpc.GatewayServiceStub(channel))
        finally:
            await gateway.stop(grace=0)


def unheld(
    agent: str,
    input_value: dict[str, Any] | None = None,
    policy: int = pb.CANCEL_POLICY_STOP,
    key: str = "",
) -> pb.StartAndStreamRequest:
    request = start_request(agent, input_value, policy)
    request.no_hold = True
    request.idempotency_key = key
    return request


def seqs(updates: list[Any]) -> list[int]:
    return [u.event.seq for u in updates if u.WhichOneof("update") == "event"]


def assert_one_call(proxy: FaultProxy, starts: int = 1) -> None:
    """Every start went by StartAndWatchOperation: no held start, release or separate watch."""
    assert proxy.calls["StartAndWatchOperation"] == starts
    assert all(proxy.calls[m] == 0 for m in (*HELD_PATH, "WatchOperation")), proxy.calls


async def test_the_id_then_every_event_to_the_end_on_one_runtime_stream(setup: Setup) -> None:
    call = setup.client.StartAndStream(unheld("ticker", {"steps": 3, "step_seconds": 0.02}))
    updates = await read_until(call, is_terminal)
    assert kind(updates[0]) == "accepted"
    op_id = updates[0].accepted.operation_id
    assert kind(updates[1]) == "event:created" and "event:step_started" in map(kind, updates)
    assert seqs(updates) == list(range(1, len(updates))), "gap or repeat"
    assert kind(updates[-1]) == "event:completed"
    stored = await setup.runtime.app.storage.events_after(op_id, 0)
    assert [e.seq for e in stored] == seqs(updates)
    assert_one_call(setup.proxy)
    assert setup.runtime.app.hub.watcher_count(op_id) == 0  # the runtime stream has ended


async def test_a_repeated_key_streams_the_same_operation(setup: Setup) -> None:
    ticker = {"steps": 2, "step_seconds": 0.02}
    first = await read_until(
        setup.client.StartAndStream(unheld("ticker", ticker, key="k")), is_terminal
    )
    again = await read_until(
        setup.client.StartAndStream(unheld("ticker", ticker, key="k")), is_terminal
    )
    assert first[0].accepted.operation_id == again[0].accepted.operation_id
    assert seqs(again) == seqs(first) == list(range(1, len(first)))
    page, _ = await setup.runtime.app.operations.list(None, 10, "")
    assert len(page) == 1 and page[0].steps_completed == 2  # ran once
    assert_one_call(setup.proxy, starts=2)


async def test_a_stop_by_key_before_the_start_creates_it_interrupted(
    setup: Setup, gated: GatedAgent
) -> None:
    answer = await setup.client.StopOperation(
        pb.StopOperationRequest(idempotency_key="early", reason="before the start")
    )
    assert answer.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD
    updates = await read_until(
        setup.client.StartAndStream(unheld("gated", key="early")), is_terminal
    )
    assert [kind(u) for u in updates] == [
        "accepted",
        "event:created",
        "event:stop_requested",
        "event:interrupted",
    ]
    assert updates[0].accepted.operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert updates[-1].event.interrupted.mid_step is False
    assert gated.steps_started == []


@pytest.mark.parametrize("policy", [pb.CANCEL_POLICY_STOP, pb.CANCEL_POLICY_KEEP_RUNNING])
async def test_a_client_cancel_during_the_start_applies_its_policy(
    setup: Setup, gated: GatedAgent, policy: int
) -> None:
    """The trade-off of no_hold: under the stop policy the operation is stopped (cause: client
    gone), but unlike a held start its first step may have begun and be cut mid-step. Either
    way the start's runtime stream is closed, and nothing is released (nothing is held)."""
    proxy = setup.proxy
    proxy.freeze("StartAndWatchOperation")
    call = setup.client.StartAndStream(unheld("gated", policy=policy))

    async def start_held() -> bool:
        return proxy.held["StartAndWatchOperation"] == 1

    async def client_gone() -> bool:
        return setup.gateway.gateway.stream_slots.total == 0

    await eventually(start_held)
    call.cancel()  # the client leaves while its start is in flight
    await eventually(client_gone)
    proxy.unfreeze()
    page = await eventually(lambda: _only(setup.runtime))
    if policy == pb.CANCEL_POLICY_STOP:
        operation = await eventually(lambda: ended(setup.runtime, page.id))
        assert operation.status is OperationStatus.INTERRUPTED
        assert operation.stop.cause is StopCause.CLIENT_GONE
        assert operation.stop.reason == "the client's stream was cancelled"
    else:
        await eventually(lambda: _step_began(gated, page.id))
    await setup.gateway.gateway.settle()

    async def unwatched() -> bool:
        return setup.runtime.app.hub.watcher_count(page.id) == 0

    await eventually(unwatched)  # the start's stream was closed: nobody reads it
    assert proxy.calls["ReleaseOperation"] == 0
    if policy == pb.CANCEL_POLICY_KEEP_RUNNING:
        operation = await setup.runtime.app.operations.get(page.id)
        assert operation.status is OperationStatus.RUNNING and operation.stop is None


async def _step_began(gated: GatedAgent, op_id: str) -> bool:
    return (op_id, 0) in gated.steps_started


async def test_a_client_cancel_after_the_id_cuts_the_first_step(
    setup: Setup, gated: GatedAgent
) -> None:
    call = setup.client.StartAndStream(unheld("gated", policy=pb.CANCEL_POLICY_STOP))
    updates = await read_until(call, lambda u: kind(u) == "event:output_chunk")
    op_id = updates[0].accepted.operation_id
    call.cancel()
    operation = await eventually(lambda: ended(setup.runtime, op_id))
    assert operation.status is OperationStatus.INTERRUPTED
    assert operation.stop.cause is StopCause.CLIENT_GONE
    events = await setup.runtime.app.storage.events_after(op_id, 0)
    assert events[-1].kind.value == "interrupted" and events[-1].data["mid_step"] is True


async def test_a_broken_start_stream_resumes_without_gap_or_repeat(
    setup: Setup, gated: GatedAgent
) -> None:
    """The runtime stream breaks after the answer and the first batch of events: the gateway
    goes on with a watch of its own from the last seq it relayed."""
    setup.proxy.break_streams("StartAndWatchOperation", after=2)
    call = setup.client.StartAndStream(unheld("gated", {"steps": 3}))
    first = await read_until(call, lambda u: kind(u) == "event:created")
    op_id = first[0].accepted.operation_id

    async def broken() -> bool:
        return setup.proxy.broken["StartAndWatchOperation"] == 1

    await eventually(broken)
    gated.open(op_id)
    rest = await read_until(call, is_terminal)
    got = seqs(first + rest)
    assert got == list(range(1, len(got) + 1)), f"gap or repeat: {got}"
    assert kind(rest[-1]) == "event:completed"
    assert setup.proxy.calls["WatchOperation"] >= 1  # resumed by the follower's own watch
    assert setup.proxy.calls["StartAndWatchOperation"] == 1  # not started again


async def test_a_runtime_restart_mid_stream_leaves_no_gap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    gated = GatedAgent()
    first = await start_runtime(runtime_config(url), registry(gated))
    address = first.address
    gateway = await start_gateway(gateway_config(address))
    second: RunningRuntime | None = None
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            call = client.StartAndStream(
                unheld("gated", {"steps": 3}, pb.CANCEL_POLICY_KEEP_RUNNING)
            )
            before = await read_until(call, lambda u: kind(u) == "event:output_chunk")
            op_id = before[0].accepted.operation_id
            await first.stop(grace=0)
            second = await start_runtime(runtime_config(url, address=address), registry(gated))
            gated.open(op_id)
            rest = await read_until(call, is_terminal, timeout=30)
        got = seqs(before + rest)
        assert got == list(range(1, len(got) + 1)), f"gap or repeat: {got}"
        assert kind(rest[-1]) == "event:completed"
    finally:
        await gateway.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)


async def test_refusals(setup: Setup) -> None:
    """Unauthenticated at either service, and an invalid start."""
    async with gateway_channel(setup.gateway.address, token=None) as channel:
        anonymous = pb_grpc.GatewayServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await read_until(anonymous.StartAndStream(unheld("ticker")), is_terminal)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError) as err:
        await read_until(setup.client.StartAndStream(unheld("no-such-agent")), is_terminal)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent" in (err.value.details() or "")

    start = rt_pb.StartOperationRequest(agent="ticker")
    async with runtime_channel(setup.runtime.address, token=None) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await _drain(
                stub.StartAndWatchOperation(rt_pb.StartAndWatchOperationRequest(start=start))
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    page, _ = await setup.runtime.app.operations.list(None, 10, "")
    assert page == []  # nothing was created by any of them


async def test_the_runtime_stream_answers_first_then_events(setup: Setup) -> None:
    """The runtime's RPC alone: the answer (created true, then false for the same key), then
    batches of events from seq 1 to the terminal one."""
    start = rt_pb.StartOperationRequest(agent="echo", idempotency_key="direct", owner="o")
    start.input.update({"hello": "world"})
    request = rt_pb.StartAndWatchOperationRequest(start=start)
    async with runtime_channel(setup.runtime.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        for created in (True, False):
            messages = await _drain(stub.StartAndWatchOperation(request))
            assert messages[0].HasField("started") and not messages[0].events
            assert messages[0].started.created is created
            events = [e for m in messages[1:] for e in m.events]
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[-1].WhichOneof("kind") == "completed"


async def _drain(call: Any) -> list[Any]:
    return await asyncio.wait_for(_collect(call), 20)


async def _collect(call: Any) -> list[Any]:
    return [message async for message in call]


async def _only(runtime: RunningRuntime) -> Any:
    page, _ = await runtime.app.operations.list(None, 10, "")
    return page[0] if len(page) == 1 else None
