"""GatewayService end to end: runtime and gateways in process on free ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from gateway_service.config import GatewayConfig
from gateway_service.server import RunningGateway, start_gateway
from runtime_service.server import RunningRuntime, start_runtime
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import operation_pb2 as op_pb
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config
from tests.credentials import AUTH, SERVICE_TOKEN, gateway_channel
from tests.processes import free_port

if TYPE_CHECKING:
    Stub = pb_grpc.GatewayServiceAsyncStub

TICKER_30S = {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 5}
TERMINAL = ("completed", "failed", "interrupted")


def gateway_config(runtime_address: str, **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "runtime_address": runtime_address,
        "stop_delivery_deadline_seconds": 15.0,
        "watch_reconnect_deadline_seconds": 15.0,
        "shutdown_grace_seconds": 0.0,
        "auth": AUTH,
        "service_token": SERVICE_TOKEN,
    }
    settings.update(overrides)
    return GatewayConfig(**settings)


@pytest.fixture
async def gateway(runtime: RunningRuntime) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(gateway_config(runtime.address))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[Stub]:
    async with gateway_channel(gateway.address) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


def start_request(
    agent: str,
    input_value: dict[str, Any] | None = None,
    policy: int = pb.CANCEL_POLICY_STOP,
    grace: float | None = None,
) -> pb.StartAndStreamRequest:
    request = pb.StartAndStreamRequest(agent=agent, cancel_policy=policy)  # type: ignore[arg-type]
    request.input.update(input_value or {})
    if grace is not None:
        request.cancel_grace.CopyFrom(duration_pb2.Duration(nanos=int(grace * 1e9)))
    return request


def kind(update: Any) -> str:
    which = update.WhichOneof("update")
    return f"event:{update.event.WhichOneof('kind')}" if which == "event" else str(which)


async def read_until(call: Any, predicate: Callable[[Any], bool], timeout: float = 20) -> list[Any]:
    """Read a stream's messages until one matches (included); fail at the deadline."""
    seen: list[Any] = []

    async def run() -> list[Any]:
        async for update in call:
            seen.append(update)
            if predicate(update):
                return seen
        raise AssertionError(f"stream ended before the expected message: {[kind(u) for u in seen]}")

    return await asyncio.wait_for(run(), timeout)


def is_chunk(update: Any) -> bool:
    return kind(update) == "event:output_chunk"


def is_terminal(update: Any) -> bool:
    return update.WhichOneof("update") == "event" and update.event.WhichOneof("kind") in TERMINAL


async def runtime_status(runtime: RunningRuntime, op_id: str) -> Any:
    return await runtime.app.operations.get(op_id)


async def ended(runtime: RunningRuntime, op_id: str) -> Any:
    operation = await runtime.app.operations.get(op_id)
    return operation if operation.status.is_terminal else None


# ------------------------------------------------------------------------ basics


async def test_first_message_carries_the_id_then_events_in_order(client: Stub) -> None:
    call = client.StartAndStream(start_request("ticker", {"steps": 2, "step_seconds": 0.05}))
    updates = await read_until(call, is_terminal)
    assert kind(updates[0]) == "accepted" and updates[0].accepted.operation_id
    events = [u.event for u in updates[1:]]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].WhichOneof("kind") == "completed"
    shown = await client.GetOperation(
        pb.GetOperationRequest(operation_id=updates[0].accepted.operation_id)
    )
    assert shown.operation.status == op_pb.OPERATION_STATUS_COMPLETED
    listed = await client.ListOperations(pb.ListOperationsRequest())
    assert [o.id for o in listed.operations] == [shown.operation.id]


async def test_stop_rpc_answers_without_waiting_for_the_step(
    client: Stub, runtime: RunningRuntime
) -> None:
    call = client.StartAndStream(start_request("ticker", TICKER_30S))
    updates = await read_until(call, is_chunk)
    op_id = updates[0].accepted.operation_id
    answer = await client.StopOperation(
        pb.StopOperationRequest(operation_id=op_id, reason="enough")
    )
    assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
    assert answer.outcome == 1  # ACCEPTED
    rest = await read_until(call, is_terminal)
    kinds = [kind(u) for u in rest]
    # The gateway's own notice comes first, then the runtime's durable events.
    assert kinds[0] == "stop_requested"
    assert kinds[-2:] == ["event:stop_requested", "event:interrupted"]
    assert rest[-1].event.interrupted.mid_step
    again = await client.StopOperation(pb.StopOperationRequest(operation_id=op_id))
    assert again.delivery == pb.STOP_DELIVERY_DELIVERED and again.outcome == 2  # ALREADY_REQUESTED


async def test_gateway_errors_carry_the_runtime_status(client: Stub) -> None:
    cases: list[tuple[Any, grpc.StatusCode]] = [
        (
            client.GetOperation(pb.GetOperationRequest(operation_id="nope")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            client.GetOperation(
                pb.GetOperationRequest(operation_id="3f2b1c4d-0000-4000-8000-000000000000")
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            client.StopOperation(
                pb.StopOperationRequest(operation_id="3f2b1c4d-0000-4000-8000-000000000000")
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            client.ListOperations(pb.ListOperationsRequest(page_size=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for call, code in cases:
        with pytest.raises(aio.AioRpcError) as err:
            await call
        assert err.value.code() == code, err.value.details()
    with pytest.raises(aio.AioRpcError) as err:
        await read_until(client.StartAndStream(start_request("no-such-agent")), is_terminal)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent" in (err.value.details() or "")
    with pytest.raises(aio.AioRpcError) as err:
        await read_until(
            client.StreamOperation(pb.StreamOperationRequest(operation_id="x", after_seq=0)),
            is_terminal,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------ cancel policies


async def test_cancelled_stream_under_stop_policy_stops_the_operation(
    client: Stub, gateway: RunningGateway, runtime: RunningRuntime
) -> None:
    call = client.StartAndStream(start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_STOP))
    updates = await read_until(call, is_chunk)
    op_id = updates[0].accepted.operation_id
    call.cancel()
    operation = await eventually(lambda: ended(runtime, op_id))
    assert operation.status.value == "INTERRUPTED"
    assert operation.stop.reason == "the client's stream was cancelled"


async def test_keep_running_policy_survives_cancel_and_reconnects_through_another_gateway(
    client: Stub, gateway: RunningGateway, runtime: RunningRuntime
) -> None:
    ticker = {"steps": 3, "step_seconds": 0.3, "chunk_interval_seconds": 0.05}
    call = client.StartAndStream(start_request("ticker", ticker, pb.CANCEL_POLICY_KEEP_RUNNING))
    updates = await read_until(call, lambda u: kind(u) == "event:step_completed")
    op_id = updates[0].accepted.operation_id
    last_seen = updates[-1].event.seq
    call.cancel()
    await gateway.gateway.settle()
    assert (await runtime_status(runtime, op_id)).stop is None  # not stopped

    second = await start_gateway(gateway_config(runtime.address))
    try:
        async with gateway_channel(second.address) as channel:
            other = pb_grpc.GatewayServiceStub(channel)
            resumed = other.StreamOperation(
                pb.StreamOperationRequest(operation_id=op_id, after_seq=last_seen)
            )
            rest = await read_until(resumed, is_terminal)
    finally:
        await second.stop(grace=0)
    seqs = [u.event.seq for u in rest]
    assert seqs == list(range(last_seen + 1, last_seen + 1 + len(seqs))), "gap or repeat"
    assert rest[-1].event.WhichOneof("kind") == "completed"
    stored = [e.seq for e in await runtime.app.storage.events_after(op_id, 0)]
    assert stored == list(range(1, seqs[-1] + 1))


async def test_grace_policy_stops_when_nobody_reconnects(
    client: Stub, gateway: RunningGateway, runtime: RunningRuntime
) -> None:
    call = client.StartAndStream(
        start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_STOP_AFTER_GRACE, grace=0.2)
    )
    updates = await read_until(call, is_chunk)
    op_id = updates[0].accepted.operation_id
    call.cancel()
    await gateway.gateway.settle()
    operation = await eventually(lambda: ended(runtime, op_id))
    assert operation.status.value == "INTERRUPTED"
    assert "nobody reconnected" in operation.stop.reason


async def test_grace_policy_spares_an_operation_someone_reconnected_to(
    client: Stub, gateway: RunningGateway, runtime: RunningRuntime
) -> None:
    call = client.StartAndStream(
        start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_STOP_AFTER_GRACE, grace=1.0)
    )
    updates = await read_until(call, is_chunk)
    op_id = updates[0].accepted.operation_id
    call.cancel()
    # Reconnect through a *different* gateway: only the runtime can tell this one about it.
    second = await start_gateway(gateway_config(runtime.address))
    try:
        async with gateway_channel(second.address) as channel:
            other = pb_grpc.GatewayServiceStub(channel)
            resumed = other.StreamOperation(
                pb.StreamOperationRequest(operation_id=op_id, after_seq=0)
            )
            await read_until(resumed, is_chunk)
            await gateway.gateway.settle()  # the grace ran out while we were watching
            operation = await runtime_status(runtime, op_id)
            assert operation.status.value == "RUNNING" and operation.stop is None
            await other.StopOperation(pb.StopOperationRequest(operation_id=op_id))
            await read_until(resumed, is_terminal)
    finally:
        await second.stop(grace=0)


# ------------------------------------------------------------------------ early and late stops


async def test_stop_while_the_runtime_is_still_handling_the_start_runs_no_step(
    client: Stub, gateway: RunningGateway, runtime: RunningRuntime, gated: GatedAgent
) -> None:
    storage = runtime.app.storage
    entered = asyncio.Event()
    proceed = asyncio.Event()
    real_create = storage.create  # what every start calls, whichever RPC it came by

    async def slow_create(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await proceed.wait()  # the injected delay
        return await real_create(*args, **kwargs)

    storage.create = slow_create  # type: ignore[method-assign]
    call = client.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_STOP))
    await asyncio.wait_for(entered.wait(), 10)
    call.cancel()  # the client stops before it even knows the operation id
    proceed.set()
    listed = await eventually(lambda: _only_operation(runtime))
    operation = await eventually(lambda: ended(runtime, listed.id))
    assert operation.status.value == "INTERRUPTED"
    assert gated.steps_started == []
    assert await runtime.app.storage.step_records(operation.id) == []
    events = [e.kind.value for e in await runtime.app.storage.events_after(operation.id, 0)]
    assert events == ["created", "stop_requested", "interrupted"]


async def _only_operation(runtime: RunningRuntime) -> Any:
    page, _ = await runtime.app.operations.list(None, 10, "")
    return page[0] if len(page) == 1 else None


async def test_stop_while_runtime_is_down_lands_when_it_returns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    first = await start_runtime(runtime_config(url), registry())
    address = first.address
    gateway = await start_gateway(gateway_config(address, stop_ack_seconds=0.2))
    second: RunningRuntime | None = None
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            call = client.StartAndStream(
                start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_KEEP_RUNNING)
            )
            updates = await read_until(call, is_chunk)
            op_id = updates[0].accepted.operation_id
            await first.stop(grace=0)  # the runtime goes away mid-step
            answer = await client.StopOperation(pb.StopOperationRequest(operation_id=op_id))
            assert answer.delivery == pb.STOP_DELIVERY_PENDING  # acknowledged at once
            second = await start_runtime(runtime_config(url, address=address), registry())
            # The client's stream resumes through the restarted runtime and sees the stop land.
            rest = await read_until(call, is_terminal, timeout=30)
            assert rest[-1].event.WhichOneof("kind") == "interrupted"
            operation = await second.app.operations.get(op_id)
            assert operation.status.value == "INTERRUPTED"
            assert operation.stop is not None and operation.stop.requested_by.startswith(
                "tester (client"
            )
    finally:
        await gateway.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)


async def test_stop_past_the_delivery_deadline_is_reported_undelivered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    first = await start_runtime(runtime_config(url), registry())
    address = first.address
    gateway = await start_gateway(
        gateway_config(address, stop_ack_seconds=0.1, stop_delivery_deadline_seconds=0.5)
    )
    second: RunningRuntime | None = None
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            call = client.StartAndStream(
                start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_KEEP_RUNNING)
            )
            updates = await read_until(call, is_chunk)
            op_id = updates[0].accepted.operation_id
            await first.stop(grace=0)
            answer = await client.StopOperation(pb.StopOperationRequest(operation_id=op_id))
            assert answer.delivery == pb.STOP_DELIVERY_PENDING
            notices = await read_until(call, lambda u: kind(u) == "stop_undelivered")
            assert [kind(u) for u in notices][-2:] == ["stop_requested", "stop_undelivered"]
            assert notices[-1].stop_undelivered.attempts >= 1
            # Not stopped, and nobody pretends it was: it runs on once the runtime is back.
            second = await start_runtime(runtime_config(url, address=address), registry())
            operation = await second.app.operations.get(op_id)
            assert operation.stop is None and operation.status.value == "RUNNING"
    finally:
        await gateway.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)


# ------------------------------------------------------------------------ several clients


async def test_second_client_sees_stop_requested_before_the_terminal_event(
    client: Stub, gateway: RunningGateway
) -> None:
    call = client.StartAndStream(start_request("ticker", TICKER_30S))
    updates = await read_until(call, is_chunk)
    op_id = updates[0].accepted.operation_id
    watcher = client.StreamOperation(pb.StreamOperationRequest(operation_id=op_id, after_seq=0))
    await read_until(watcher, is_chunk)
    await client.StopOperation(pb.StopOperationRequest(operation_id=op_id))
    seen = [kind(u) for u in await read_until(watcher, is_terminal)]
    assert "stop_requested" in seen
    assert seen.index("stop_requested") < seen.index("event:interrupted")
    assert seen.index("event:stop_requested") < seen.index("event:interrupted")


async def test_runtime_restart_under_a_streaming_gateway_leaves_no_gap(tmp_path: Path) -> None:
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
                start_request("gated", {"steps": 3}, pb.CANCEL_POLICY_KEEP_RUNNING)
            )
            first_part = await read_until(call, is_chunk)
            op_id = first_part[0].accepted.operation_id
            gated.release(op_id)  # step 0 completes, step 1 starts
            first_part += await read_until(
                call, lambda u: kind(u) == "event:step_started" and u.event.step_started.step == 1
            )
            await first.stop(grace=0)
            second = await start_runtime(runtime_config(url, address=address), registry(gated))
            gated.open(op_id)
            rest = await read_until(call, is_terminal, timeout=30)
        seqs = [u.event.seq for u in first_part + rest if u.WhichOneof("update") == "event"]
        assert seqs == list(range(1, len(seqs) + 1)), f"gap or repeat: {seqs}"
        assert rest[-1].event.WhichOneof("kind") == "completed"
    finally:
        await gateway.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)


async def test_gateway_serves_health_and_reflection(gateway: RunningGateway) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with gateway_channel(gateway.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="stopline.gateway.v1.GatewayService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_gateway_service_is_not_serving_while_no_runtime_answers(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    service = "stopline.gateway.v1.GatewayService"
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    address = f"127.0.0.1:{free_port()}"
    gateway = await start_gateway(gateway_config(address, readiness_interval_seconds=0.05))
    runtime: RunningRuntime | None = None
    try:
        async with aio.insecure_channel(gateway.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str = service) -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                return int(reply.status)

            async def reports(wanted: int) -> bool:
                return await status() == wanted

            # No runtime yet: known before the gateway listens. Alive all the same.
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status("") == serving
            runtime = await start_runtime(runtime_config(url, address=address), registry())
            await eventually(lambda: reports(serving))
            await runtime.stop(grace=0)
            runtime = None
            await eventually(lambda: reports(health_pb2.HealthCheckResponse.NOT_SERVING))
            assert await status("") == serving
            runtime = await start_runtime(runtime_config(url, address=address), registry())
            await eventually(lambda: reports(serving))
    finally:
        await gateway.stop(grace=0)
        if runtime is not None:
            await runtime.stop(grace=0)


async def test_a_rejected_reconnect_does_not_trigger_the_cancel_policy(
    client: Stub, gateway: RunningGateway, runtime: RunningRuntime
) -> None:
    """Regression: an error ending a stream (here OUT_OF_RANGE) is not a client leaving."""
    call = client.StartAndStream(start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_STOP))
    updates = await read_until(call, is_chunk)
    op_id = updates[0].accepted.operation_id
    with pytest.raises(aio.AioRpcError) as err:
        await read_until(
            client.StreamOperation(pb.StreamOperationRequest(operation_id=op_id, after_seq=9999)),
            is_terminal,
        )
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    await gateway.gateway.settle()
    operation = await runtime_status(runtime, op_id)
    assert operation.stop is None and operation.status.value == "RUNNING"
    call.cancel()
