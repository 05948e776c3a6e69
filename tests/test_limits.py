"""Limits: the plain-Python checks (stopline/limits.py), then each limit as a caller meets it over
gRPC, and health still answering while the limits are saturated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf import struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_service.cli import gateway as gateway_cli
from gateway_service.config import GatewayConfig
from gateway_service.server import RunningGateway, start_gateway
from runtime_service.server import RunningRuntime, start_runtime
from stopline.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.limits import (
    MAX_INPUT_DEPTH,
    StreamLimiter,
    check_input_size,
    check_page_size,
    idle_stream_error,
    json_depth,
    json_size,
    struct_to_input,
)
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config
from tests.credentials import (
    OTHER_PRINCIPAL,
    OTHER_TOKEN,
    PRINCIPAL,
    gateway_channel,
    runtime_channel,
)
from tests.test_gateway import (
    gateway_config,
    is_chunk,
    is_terminal,
    kind,
    read_until,
    start_request,
)

if TYPE_CHECKING:
    Stub = pb_grpc.GatewayServiceAsyncStub

TICKER_30S = {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 5}

# ------------------------------------------------------------------------ the plain checks


def test_page_size_names_the_limit() -> None:
    check_page_size(0, 10)
    check_page_size(10, 10)
    with pytest.raises(InvalidArgument, match=r"page_size: is 11; the limit is 10 \(max_page"):
        check_page_size(11, 10)
    with pytest.raises(InvalidArgument, match="must not be negative"):
        check_page_size(-1, 10)


def test_input_size_is_compact_utf8_json_and_names_the_limit() -> None:
    assert json_size({"a": "é"}) == len('{"a":"é"}'.encode())
    check_input_size({"a": "x" * 8}, 16)
    with pytest.raises(InvalidArgument, match=r"is 17 bytes as JSON; the limit is 16 bytes"):
        check_input_size({"a": "x" * 9}, 16)
    deep: dict[str, Any] = {}
    for _ in range(100_000):
        deep = {"a": deep}
    with pytest.raises(InvalidArgument, match="nested 100001 levels deep"):
        check_input_size(deep, 1 << 30)
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        json_size(deep)


def test_stream_limiter_caps_overall_and_per_key_and_frees_slots() -> None:
    limiter = StreamLimiter(max_total=3, max_per_key=2)
    with limiter.acquire("alice"), limiter.acquire("alice"):
        with (
            pytest.raises(ResourceExhausted, match=r"alice .* limit is 2 \(max_streams_per_"),
            limiter.acquire("alice"),
        ):
            pass
        with limiter.acquire("bob"):
            assert limiter.total == 3
            with (
                pytest.raises(ResourceExhausted, match=r"limit is 3 \(max_streams\)"),
                limiter.acquire("carol"),
            ):
                pass
        assert limiter.count("alice") == 2 and limiter.count("bob") == 0
    assert limiter.total == 0 and limiter.count("alice") == 0


def test_stream_limiter_frees_the_slot_when_the_stream_fails() -> None:
    limiter = StreamLimiter(max_total=1)
    with pytest.raises(RuntimeError), limiter.acquire(PRINCIPAL):
        raise RuntimeError("the stream broke")
    with limiter.acquire(PRINCIPAL):
        assert limiter.total == 1
    with pytest.raises(ValueError, match="at least 1"):
        StreamLimiter(max_total=0)


def test_idle_error_says_how_to_carry_on() -> None:
    error = idle_stream_error(2.5, 7)
    assert isinstance(error, DeadlineExceeded)
    assert "2.5s" in str(error) and "stream_idle_seconds" in str(error)
    assert str(error).endswith("reconnect with after_seq=7")


# ------------------------------------------------------------------------ over gRPC


@pytest.fixture
async def limited(
    runtime: RunningRuntime, request: pytest.FixtureRequest
) -> AsyncIterator[RunningGateway]:
    """A gateway with small limits, so that tests can reach them (a test may set its own idle
    timeout through indirect parametrisation)."""
    running = await start_gateway(
        gateway_config(
            runtime.address,
            max_input_bytes=1000,
            max_page_size=5,
            max_request_bytes=64 * 1024,
            max_streams=4,
            stream_idle_seconds=getattr(request, "param", 0.5),
        )
    )
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def client(limited: RunningGateway) -> AsyncIterator[Stub]:
    async with gateway_channel(limited.address) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


async def _drain(call: Any) -> None:
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


async def rpc_error(call: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as err:
        await _drain(call)
    return err.value


async def test_page_size_over_the_maximum_is_refused_by_both_services(
    client: Stub, runtime: RunningRuntime
) -> None:
    error = await rpc_error(client.ListOperations(pb.ListOperationsRequest(page_size=6)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "page_size: is 6; the limit is 5 (max_page_size)"
    assert (await client.ListOperations(pb.ListOperationsRequest(page_size=5))).operations == []
    async with runtime_channel(runtime.address) as channel:
        direct = rt_grpc.RuntimeServiceStub(channel)
        limit = runtime.app.config.max_page_size
        error = await rpc_error(
            direct.ListOperations(rt_pb.ListOperationsRequest(page_size=limit + 1))
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the limit is {limit} (max_page_size)" in (error.details() or "")


async def test_gateway_refuses_oversized_input_without_calling_the_runtime(
    client: Stub, runtime: RunningRuntime
) -> None:
    error = await rpc_error(client.StartAndStream(start_request("echo", {"blob": "x" * 1000})))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        error.details()
    ) == "input: is 1011 bytes as JSON; the limit is 1000 bytes (max_input_bytes)"
    page, _ = await runtime.app.operations.list(None, 10, "")
    assert page == []  # nothing was created


async def test_request_over_the_receive_limit_is_resource_exhausted(
    client: Stub, limited: RunningGateway
) -> None:
    # 2 x max_input_bytes is below max_request_bytes here, so the request limit applies as set.
    error = await rpc_error(client.StopOperation(pb.StopOperationRequest(reason="r" * 70_000)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC's own wording, before any Stopline code runs: the size and the limit in bytes.
    assert "Received message larger than max" in (error.details() or "")
    assert f"vs. {64 * 1024})" in (error.details() or "")


async def test_idle_stream_ends_with_deadline_exceeded_and_a_reconnect_hint(
    client: Stub, runtime: RunningRuntime, gated: GatedAgent
) -> None:
    call = client.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_KEEP_RUNNING))
    seen = await read_until(call, is_chunk)  # the gated step waits: no more events for now
    op_id = seen[0].accepted.operation_id
    last = seen[-1].event.seq
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_seconds" in (error.details() or "")
    assert (error.details() or "").endswith(f"reconnect with after_seq={last}")
    # Not a client leaving: the keep-running operation is untouched, and a reconnect works.
    assert (await runtime.app.operations.get(op_id)).stop is None
    resumed = client.StreamOperation(pb.StreamOperationRequest(operation_id=op_id, after_seq=last))
    gated.open(op_id)
    rest = await read_until(resumed, is_terminal)
    seqs = [u.event.seq for u in rest if u.WhichOneof("update") == "event"]
    assert seqs == list(range(last + 1, last + 1 + len(seqs)))


async def test_stream_cap_refuses_the_next_stream_and_frees_slots(
    client: Stub, limited: RunningGateway, runtime: RunningRuntime
) -> None:
    # The idle limit is 0.5 s here: the streams below are kept busy by a ticker chunking fast.
    busy = {"steps": 1, "step_seconds": 60, "chunk_interval_seconds": 0.1}
    calls = [
        client.StartAndStream(start_request("ticker", busy, pb.CANCEL_POLICY_STOP))
        for _ in range(4)
    ]
    for call in calls:
        await read_until(call, is_chunk)
    assert limited.gateway.stream_slots.total == 4
    error = await rpc_error(client.StartAndStream(start_request("echo")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 4 (max_streams)" in (error.details() or "")
    error = await rpc_error(
        client.StreamOperation(
            pb.StreamOperationRequest(operation_id="3f2b1c4d-0000-4000-8000-000000000000")
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    page, _ = await runtime.app.operations.list(None, 10, "")
    assert len(page) == 4  # the refused start created nothing
    calls[0].cancel()
    await eventually(lambda: _slots_below(limited, 4))
    again = client.StartAndStream(start_request("echo"))
    assert kind((await read_until(again, is_terminal))[-1]) == "event:completed"
    for call in calls[1:]:
        call.cancel()


async def _slots_below(gateway: RunningGateway, count: int) -> bool:
    return gateway.gateway.stream_slots.total < count


# ------------------------------------------------------------------------ per principal


@pytest.fixture
async def per_principal(runtime: RunningRuntime) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(gateway_config(runtime.address, max_streams_per_principal=2))
    try:
        yield running
    finally:
        await running.stop(grace=0)


async def test_streams_per_principal_are_capped_for_each_caller_apart(
    per_principal: RunningGateway, runtime: RunningRuntime
) -> None:
    slots = per_principal.gateway.stream_slots
    busy = {"steps": 1, "step_seconds": 60, "chunk_interval_seconds": 0.1}
    async with (
        gateway_channel(per_principal.address) as mine,
        gateway_channel(per_principal.address, OTHER_TOKEN) as theirs,
    ):
        tester, other = pb_grpc.GatewayServiceStub(mine), pb_grpc.GatewayServiceStub(theirs)
        calls = [
            tester.StartAndStream(start_request("ticker", busy, pb.CANCEL_POLICY_STOP))
            for _ in range(2)
        ]
        try:
            for call in calls:
                await read_until(call, is_chunk)
            assert slots.count(PRINCIPAL) == 2
            error = await rpc_error(tester.StartAndStream(start_request("echo")))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == (
                f"{PRINCIPAL} already has 2 open streams; "
                "the limit is 2 (max_streams_per_principal)"
            )
            op_id = (await runtime.app.operations.list(None, 10, ""))[0][0].id
            error = await rpc_error(
                tester.StreamOperation(pb.StreamOperationRequest(operation_id=op_id))
            )
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            page, _ = await runtime.app.operations.list(None, 10, "")
            assert len(page) == 2  # the refused start created nothing
            # Another principal has slots of its own.
            theirs_done = await read_until(other.StartAndStream(start_request("echo")), is_terminal)
            assert kind(theirs_done[-1]) == "event:completed"
            assert theirs_done[0].accepted.operation.owner == OTHER_PRINCIPAL
            # Closing one of tester's streams frees a slot for tester.
            calls[0].cancel()
            await eventually(lambda: _count_below(per_principal, PRINCIPAL, 2))
            again = await read_until(tester.StartAndStream(start_request("echo")), is_terminal)
            assert kind(again[-1]) == "event:completed"
        finally:
            for call in calls:
                call.cancel()
    await eventually(lambda: _count_below(per_principal, PRINCIPAL, 1))
    assert slots.total == 0


async def _count_below(gateway: RunningGateway, principal: str, count: int) -> bool:
    return gateway.gateway.stream_slots.count(principal) < count


@pytest.fixture
async def paged_runtime(sqlite_url: str, gated: GatedAgent) -> AsyncIterator[RunningRuntime]:
    """A runtime answering one operation per page, so counting a caller's operations pages."""
    running = await start_runtime(runtime_config(sqlite_url, default_page_size=1), registry(gated))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def running_capped(paged_runtime: RunningRuntime) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(
        gateway_config(paged_runtime.address, max_running_per_principal=2)
    )
    try:
        yield running
    finally:
        await running.stop(grace=0)


async def _ended(runtime: RunningRuntime, op_id: str) -> bool:
    return (await runtime.app.operations.get(op_id)).status.is_terminal


async def test_running_operations_per_principal_are_capped(
    running_capped: RunningGateway, paged_runtime: RunningRuntime, gated: GatedAgent
) -> None:
    runtime = paged_runtime
    refusal = "max_running_per_principal (2) reached; stop or wait for one of your operations"
    async with (
        gateway_channel(running_capped.address) as mine,
        gateway_channel(running_capped.address, OTHER_TOKEN) as theirs,
    ):
        tester, other = pb_grpc.GatewayServiceStub(mine), pb_grpc.GatewayServiceStub(theirs)
        # Two operations that run on after their clients leave: the cap counts operations, not
        # streams (one PENDING-held and one RUNNING would count the same).
        op_ids = []
        for _ in range(2):
            call = tester.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_KEEP_RUNNING))
            op_ids.append((await read_until(call, is_chunk))[0].accepted.operation_id)
            call.cancel()
        await eventually(lambda: _slots_below(running_capped, 1))
        for request in (start_request("echo"), start_request("gated", {}, pb.CANCEL_POLICY_STOP)):
            error = await rpc_error(tester.StartAndStream(request))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == refusal
        page, _ = await runtime.app.operations.list(None, 10, "")
        assert {o.id for o in page} == set(op_ids)  # the refused starts created nothing
        # Another principal's operations are counted apart.
        theirs_done = await read_until(other.StartAndStream(start_request("echo")), is_terminal)
        assert kind(theirs_done[-1]) == "event:completed"
        # Stopping one of tester's operations frees its place once it has ended...
        await tester.StopOperation(pb.StopOperationRequest(operation_id=op_ids[0]))
        await eventually(lambda: _ended(runtime, op_ids[0]))
        again = await read_until(tester.StartAndStream(start_request("echo")), is_terminal)
        assert kind(again[-1]) == "event:completed"
        # ...and so does one that finishes by itself.
        call = tester.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_STOP))
        third = (await read_until(call, is_chunk))[0].accepted.operation_id
        error = await rpc_error(tester.StartAndStream(start_request("echo")))
        assert error.details() == refusal
        gated.open(third)
        await read_until(call, is_terminal)
        again = await read_until(tester.StartAndStream(start_request("echo")), is_terminal)
        assert kind(again[-1]) == "event:completed"
        gated.open(op_ids[1])
        await eventually(lambda: _ended(runtime, op_ids[1]))


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, None),
        (["--max-running-per-principal", "3"], {}, 3),
        ([], {"STOPLINE_MAX_RUNNING_PER_PRINCIPAL": "7"}, 7),
    ],
)
def test_running_limit_is_set_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: int | None
) -> None:
    configs: list[GatewayConfig] = []

    async def record(config: GatewayConfig) -> None:
        configs.append(config)

    monkeypatch.setattr("gateway_service.server.serve", record)
    result = CliRunner().invoke(gateway_cli, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    assert configs[0].max_running_per_principal == expected


# The flood below can keep the event loop busy past a short idle timeout: the gateway would then
# close a saturating stream as idle, free its slot, and a start meant to be refused would run.
@pytest.mark.parametrize("limited", [60.0], indirect=True)
async def test_health_answers_serving_while_the_limits_are_saturated(
    client: Stub, limited: RunningGateway, runtime: RunningRuntime
) -> None:
    busy = {"steps": 1, "step_seconds": 60, "chunk_interval_seconds": 0.1}
    streams = [
        client.StartAndStream(start_request("ticker", busy, pb.CANCEL_POLICY_STOP))
        for _ in range(4)
    ]
    for call in streams:
        await read_until(call, is_chunk)

    async def refused_stream() -> grpc.StatusCode:
        return (await rpc_error(client.StartAndStream(start_request("echo")))).code()

    async def unary_call(i: int) -> grpc.StatusCode:
        if i % 2:
            await client.ListOperations(pb.ListOperationsRequest(page_size=5))
            return grpc.StatusCode.OK
        refused = await rpc_error(client.ListOperations(pb.ListOperationsRequest(page_size=99)))
        return refused.code()

    flood = [
        asyncio.ensure_future(c)
        for c in [*(refused_stream() for _ in range(100)), *(unary_call(i) for i in range(300))]
    ]
    try:
        for address in (limited.address, runtime.address):
            # Health needs no credentials: a plain channel, no token.
            async with aio.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, address
        codes = await asyncio.gather(*flood)
    finally:
        for call in streams:
            call.cancel()
    assert set(codes) == {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
    }


def test_input_nesting_is_capped_below_protobufs_own_limit() -> None:
    assert json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(3) == 0
    flat: dict[str, Any] = {}
    for _ in range(MAX_INPUT_DEPTH - 1):
        flat = {"n": flat}
    check_input_size(flat, 1 << 20)
    with pytest.raises(
        InvalidArgument, match=rf"nested 33 levels deep; the limit is {MAX_INPUT_DEPTH}"
    ):
        check_input_size({"n": flat}, 1 << 20)


def test_nan_and_infinity_are_not_json_input() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        value = struct_pb2.Struct()
        value.update({"x": bad})
        with pytest.raises(InvalidArgument, match="input: is not JSON"):
            struct_to_input(value)
        with pytest.raises(InvalidArgument, match="input: is not JSON"):
            check_input_size({"x": bad}, 1 << 20)
