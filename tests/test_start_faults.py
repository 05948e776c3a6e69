"""Faults between gateway and runtime around a start (issue 11): the runtime commits a start or a
release but its answer is lost, through tests/fault_proxy.py; and reconnects after the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio

from gateway_service.server import RunningGateway, start_gateway
from runtime_service.server import RunningRuntime
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import GatedAgent
from tests.conftest import eventually
from tests.credentials import gateway_channel, runtime_channel
from tests.fault_proxy import FaultProxy
from tests.test_gateway import ended, gateway_config, kind, read_until, start_request

if TYPE_CHECKING:
    Stub = pb_grpc.GatewayServiceAsyncStub

# Far longer than any wait below: a step that starts at all started because of a release.
HOLD_SECONDS = 30.0
# Well inside the hold: "the first step began while the hold would still be in force".
SOON = 10.0


@dataclass
class Setup:
    runtime: RunningRuntime
    proxy: FaultProxy
    gateway: RunningGateway
    client: Stub


@pytest.fixture
async def setup(runtime: RunningRuntime) -> AsyncIterator[Setup]:
    """A gateway whose runtime link goes through a fault proxy."""
    async with FaultProxy(runtime.address) as proxy:
        gateway = await start_gateway(
            gateway_config(proxy.address, start_hold_seconds=HOLD_SECONDS)
        )
        try:
            async with gateway_channel(gateway.address) as channel:
                yield Setup(runtime, proxy, gateway, pb_grpc.GatewayServiceStub(channel))
        finally:
            await gateway.stop(grace=0)


def is_step_started(update: Any) -> bool:
    return kind(update) == "event:step_started"


async def only_operation(runtime: RunningRuntime) -> Any:
    page, _ = await runtime.app.operations.list(None, 10, "")
    return page[0] if len(page) == 1 else None


@pytest.mark.parametrize("key", ["", "client-key-1"], ids=["gateway-key", "client-key"])
async def test_cancel_during_a_start_whose_answer_was_lost_runs_no_step(
    setup: Setup, gated: GatedAgent, key: str
) -> None:
    """Defect 1: the retry of the lost start answers created=false; it is still this call's
    operation, so the client's stop policy applies and no step runs."""
    proxy = setup.proxy
    proxy.freeze("StartAndWatchOperation")
    proxy.drop_answers("StartAndWatchOperation", 1)
    request = start_request("gated", {}, pb.CANCEL_POLICY_STOP)
    request.idempotency_key = key
    call = setup.client.StartAndStream(request)

    async def start_held() -> bool:
        return proxy.held["StartAndWatchOperation"] == 1

    async def client_gone() -> bool:
        return setup.gateway.gateway.stream_slots.total == 0

    await eventually(start_held)
    call.cancel()  # the client leaves while its start is in flight
    await eventually(client_gone)
    proxy.unfreeze()  # the runtime commits; its answer is lost; the gateway retries
    operation = await eventually(lambda: only_operation(setup.runtime))
    operation = await eventually(lambda: ended(setup.runtime, operation.id), timeout=SOON)
    assert operation.status.value == "INTERRUPTED"
    assert operation.stop.reason == "the client's stream was cancelled"
    assert gated.steps_started == []
    assert (
        proxy.dropped["StartAndWatchOperation"] == 1 and proxy.calls["StartAndWatchOperation"] >= 2
    )


async def test_a_start_whose_answer_was_lost_is_released_at_once(
    setup: Setup, gated: GatedAgent
) -> None:
    """Defect 2: the first step does not wait for the hold after a lost start answer."""
    setup.proxy.drop_answers("StartAndWatchOperation", 1)
    call = setup.client.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_STOP))
    updates = await read_until(call, is_step_started, timeout=SOON)
    assert kind(updates[0]) == "accepted"
    assert setup.proxy.dropped["StartAndWatchOperation"] == 1
    gated.open(updates[0].accepted.operation_id)
    await read_until(call, lambda u: kind(u) == "event:completed")


async def test_a_failed_release_is_retried(setup: Setup, gated: GatedAgent) -> None:
    """Defect 2: ReleaseOperation is idempotent, so a release that failed (here: refused by a
    replica that is going away, before it reached the runtime) is sent again."""
    setup.proxy.fail_calls("ReleaseOperation", 1)
    call = setup.client.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_STOP))
    updates = await read_until(call, is_step_started, timeout=SOON)
    assert setup.proxy.failed["ReleaseOperation"] == 1
    assert setup.proxy.calls["ReleaseOperation"] >= 2
    gated.open(updates[0].accepted.operation_id)
    await read_until(call, lambda u: kind(u) == "event:completed")


async def test_a_release_to_a_frozen_runtime_is_retried_when_it_thaws(
    setup: Setup, gated: GatedAgent
) -> None:
    """A release that gets no answer is given up after a short attempt timeout and sent again;
    whichever attempt lands first lets the operation run long before the hold expires."""
    setup.proxy.freeze("ReleaseOperation")
    call = setup.client.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_STOP))
    await read_until(call, lambda u: kind(u) == "accepted")

    async def retried() -> bool:
        return setup.proxy.calls["ReleaseOperation"] >= 2

    await eventually(retried, timeout=SOON)
    setup.proxy.unfreeze()
    await read_until(call, is_step_started, timeout=SOON)


async def test_a_repeated_start_by_another_call_leaves_the_first_calls_policy_alone(
    setup: Setup, gated: GatedAgent
) -> None:
    """A start that repeats an earlier call's key (its answer not lost) is not this call's
    operation: cancelling it neither releases nor stops the operation; the first call decides."""
    first_request = start_request("gated", {}, pb.CANCEL_POLICY_STOP)
    first_request.idempotency_key = "shared-key"
    first = setup.client.StartAndStream(first_request)
    updates = await read_until(first, is_step_started, timeout=SOON)
    op_id = updates[0].accepted.operation_id
    repeat = setup.client.StartAndStream(first_request)
    again = await read_until(repeat, lambda u: kind(u) == "accepted")
    assert again[0].accepted.operation_id == op_id
    repeat.cancel()
    await setup.gateway.gateway.settle()
    operation = await setup.runtime.app.operations.get(op_id)
    assert operation.stop is None and operation.status.value == "RUNNING"
    gated.open(op_id)
    await read_until(first, lambda u: kind(u) == "event:completed")


async def test_reconnect_after_the_last_event_of_a_finished_operation_ends_at_once(
    setup: Setup,
) -> None:
    """Defect 3: nothing comes after the terminal event, and the stream says so with OK status
    rather than waiting out --watch-reconnect-deadline (15 s here) for a runtime it never lost."""
    call = setup.client.StartAndStream(start_request("echo", {"word": "hi"}))
    updates = await read_until(call, lambda u: kind(u) == "event:completed")
    op_id = updates[0].accepted.operation_id
    last_seq = updates[-1].event.seq
    for after_seq in (last_seq, last_seq - 1):
        resumed = setup.client.StreamOperation(
            pb.StreamOperationRequest(operation_id=op_id, after_seq=after_seq)
        )
        rest = await asyncio.wait_for(_kinds(resumed), SOON / 2)
        assert rest == ([] if after_seq == last_seq else ["event:completed"])
        assert await resumed.code() == grpc.StatusCode.OK


async def _kinds(call: Any) -> list[str]:
    return [kind(update) async for update in call]


async def test_the_fault_proxy_relays_errors_and_delays(runtime: RunningRuntime) -> None:
    """The proxy itself: the server's errors pass through as they are; a delay holds answers."""
    missing = rt_pb.GetOperationRequest(operation_id="3f2b1c4d-0000-4000-8000-000000000000")
    async with FaultProxy(runtime.address) as proxy, runtime_channel(proxy.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetOperation(missing, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        proxy.delay("GetOperation", 30)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetOperation(missing, timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert proxy.calls["GetOperation"] == 2
