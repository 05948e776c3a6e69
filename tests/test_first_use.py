"""What a new user meets first (issue 11): numbers that stay numbers, messages in JSON, the
stop reason a client deadline leaves, the idempotency key the gateway assigns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from gateway_service.server import RunningGateway, start_gateway
from runtime_service.agents.base import InvalidInput, StepContext, StepResult
from runtime_service.agents.builtin import EchoAgent, TickerAgent
from runtime_service.agents.registry import AgentRegistry
from runtime_service.domain import OperationStatus
from runtime_service.server import RunningRuntime, start_runtime
from stopline.errors import InvalidArgument
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.ids import parse_operation_id
from stopline.json_values import shown, struct_to_python, value_to_python
from stopline.limits import struct_to_input
from stopline.render import describe_event, to_json
from stopline.v1 import runtime_service_pb2 as rt_pb
from tests.conftest import eventually, runtime_config
from tests.credentials import gateway_channel
from tests.test_gateway import gateway_config, is_terminal, read_until, start_request

MIXED: dict[str, Any] = {"a": 1, "b": 1.5, "c": [1, 2.0], "d": {"e": -3}}
MIXED_AS_INTS: dict[str, Any] = {"a": 1, "b": 1.5, "c": [1, 2], "d": {"e": -3}}


def exact(value: Any) -> Any:
    """`value` with each number tagged by its type, so 1 == 1.0 cannot hide a float."""
    if isinstance(value, dict):
        return {key: exact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [exact(item) for item in value]
    return (type(value).__name__, value)


class InputRecorder:
    """Returns the input it saw in a step; the test checks its Python types."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        self.seen.append(ctx.input)
        return StepResult(state={"count": 1}, output=ctx.input, done=True)


@pytest.fixture
def recorder() -> InputRecorder:
    return InputRecorder()


@pytest.fixture
async def stack(
    sqlite_url: str, recorder: InputRecorder
) -> AsyncIterator[tuple[RunningRuntime, RunningGateway]]:
    agents = AgentRegistry({"echo": EchoAgent(), "ticker": TickerAgent(), "recorder": recorder})
    runtime = await start_runtime(runtime_config(sqlite_url), agents)
    try:
        gateway = await start_gateway(gateway_config(runtime.address))
        try:
            yield runtime, gateway
        finally:
            await gateway.stop(grace=0)
    finally:
        await runtime.stop(grace=0)


# ------------------------------------------------------------------------ numbers


def test_a_struct_becomes_python_with_integral_numbers_as_ints() -> None:
    request = pb.StartAndStreamRequest()
    request.input.update(MIXED)
    assert exact(struct_to_python(request.input)) == exact(MIXED_AS_INTS)
    assert exact(struct_to_input(request.input)) == exact(MIXED_AS_INTS)
    # Past 2**53 a double no longer names one integer: it stays a float.
    request.input.update({"big": 2.0**60, "edge": 2.0**53, "neg": -(2.0**53)})
    converted = struct_to_python(request.input)
    assert exact([converted["big"], converted["edge"], converted["neg"]]) == exact(
        [2.0**60, 2**53, -(2**53)]
    )


async def test_integers_reach_the_agent_and_come_back_through_the_gateway(
    stack: tuple[RunningRuntime, RunningGateway], recorder: InputRecorder
) -> None:
    runtime, gateway = stack
    async with gateway_channel(gateway.address) as channel:
        client = pb_grpc.GatewayServiceStub(channel)
        call = client.StartAndStream(start_request("recorder", MIXED))
        updates = await read_until(call, is_terminal)
    assert [exact(seen) for seen in recorder.seen] == [exact(MIXED_AS_INTS)]
    operation_id = updates[0].accepted.operation_id
    stored = await runtime.app.operations.get(operation_id)
    assert exact(stored.input) == exact(MIXED_AS_INTS)
    assert exact(struct_to_python(updates[0].accepted.operation.input)) == exact(MIXED_AS_INTS)
    events = [u.event for u in updates if u.WhichOneof("update") == "event"]
    step = next(e for e in events if e.WhichOneof("kind") == "step_completed")
    completed = events[-1]
    assert exact(value_to_python(step.step_completed.output)) == exact(MIXED_AS_INTS)
    assert exact(value_to_python(completed.completed.result)) == exact(MIXED_AS_INTS)
    # The command line's renderings (`--json` and the human line) say 1, not 1.0.
    assert exact(json.loads(to_json(completed))["completed"]["result"]) == exact(MIXED_AS_INTS)
    human = describe_event(completed)
    assert exact(json.loads(human.split("COMPLETED: ", 1)[1])) == exact(MIXED_AS_INTS)


# ------------------------------------------------------------------------ messages in JSON


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"steps": None}, "input.steps: must be a number, got null"),
        ({"steps": True}, "input.steps: must be a number, got true"),
        ({"steps": [1.0]}, "input.steps: must be a number, got [1]"),
        ({"steps": "3"}, 'input.steps: must be a number, got "3"'),
        ({"steps": 2e6}, "input.steps: must be between 1 and 1000000, got 2000000"),
        ({"steps": 1.5}, "input.steps: must be a whole number, got 1.5"),
    ],
)
def test_agent_input_errors_quote_values_as_json(value: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        TickerAgent().validate_input(value)
    assert f"{caught.value.field}: {caught.value.problem}" == expected


def test_shown_values_are_json() -> None:
    assert [shown(v) for v in (None, True, [1.0], 1e6, "it's", {"a": 2.0})] == [
        "null",
        "true",
        "[1]",
        "1000000",
        '"it\'s"',
        '{"a": 2}',
    ]
    assert shown("x" * 100) == json.dumps("x" * 64 + "…", ensure_ascii=False)
    with pytest.raises(InvalidArgument, match=r'^operation_id: "nope" is not an operation id'):
        parse_operation_id("nope")


async def test_the_runtimes_own_messages_quote_values_as_json(
    stack: tuple[RunningRuntime, RunningGateway],
) -> None:
    _, gateway = stack
    async with gateway_channel(gateway.address) as channel:
        client = pb_grpc.GatewayServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await read_until(client.StartAndStream(start_request("nope")), lambda u: True)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith('agent: unknown agent "nope"; ')


# ------------------------------------------------------------------------ client deadline


async def test_a_client_deadline_stops_the_operation_and_the_reason_says_so(
    stack: tuple[RunningRuntime, RunningGateway],
) -> None:
    runtime, gateway = stack
    long_ticker = {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 5}
    async with gateway_channel(gateway.address) as channel:
        client = pb_grpc.GatewayServiceStub(channel)
        call = client.StartAndStream(start_request("ticker", long_ticker), timeout=1.5)
        seen: list[Any] = []

        async def read_all() -> None:
            async for update in call:
                seen.append(update)

        with pytest.raises(aio.AioRpcError) as caught:
            await read_all()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    operation_id = seen[0].accepted.operation_id

    async def interrupted() -> Any:
        operation = await runtime.app.operations.get(operation_id)
        return operation if operation.status is OperationStatus.INTERRUPTED else None

    operation = await eventually(interrupted, timeout=15)
    assert operation.stop is not None
    assert operation.stop.requested_by == "gateway"
    assert operation.stop.reason == "the client's deadline expired"


async def test_a_cancelled_client_stream_keeps_its_own_reason(
    stack: tuple[RunningRuntime, RunningGateway],
) -> None:
    runtime, gateway = stack
    long_ticker = {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 5}
    async with gateway_channel(gateway.address) as channel:
        client = pb_grpc.GatewayServiceStub(channel)
        call = client.StartAndStream(start_request("ticker", long_ticker), timeout=60)
        first = await read_until(call, lambda u: u.WhichOneof("update") == "accepted")
        call.cancel()
    operation_id = first[0].accepted.operation_id

    async def interrupted() -> Any:
        operation = await runtime.app.operations.get(operation_id)
        return operation if operation.status is OperationStatus.INTERRUPTED else None

    operation = await eventually(interrupted, timeout=15)
    assert operation.stop is not None and operation.stop.reason == (
        "the client's stream was cancelled"
    )


# ------------------------------------------------------------------------ idempotency key


async def test_the_gateway_assigns_a_visible_key_when_the_client_sends_none(
    stack: tuple[RunningRuntime, RunningGateway],
) -> None:
    """As documented in protos/ and the README: `gateway-<uuid>` when none was given (so the
    gateway's own retries of the start are idempotent), the client's key otherwise."""
    _, gateway = stack
    link = gateway.gateway.link
    sent: list[rt_pb.StartOperationRequest] = []
    forward = link.start_and_watch

    async def recording(request: rt_pb.StartOperationRequest) -> Any:
        sent.append(request)
        return await forward(request)

    link.start_and_watch = recording  # type: ignore[method-assign]
    async with gateway_channel(gateway.address) as channel:
        client = pb_grpc.GatewayServiceStub(channel)
        first = await read_until(client.StartAndStream(start_request("echo")), is_terminal)
        keyed = start_request("echo")
        keyed.idempotency_key = "mine-1"
        second = await read_until(client.StartAndStream(keyed), is_terminal)
    assigned = first[0].accepted.operation.idempotency_key
    assert assigned.startswith("gateway-")
    assert parse_operation_id(assigned.removeprefix("gateway-"))
    assert second[0].accepted.operation.idempotency_key == "mine-1"
    # Only the gateway knows a key it generated (until the start answers): no stop by it can
    # be stored ahead, and the runtime is told so. A client's key may have been stopped ahead.
    assert [request.key_private for request in sent] == [True, False]


def test_the_contract_documents_the_assigned_key() -> None:
    protos = Path(__file__).resolve().parent.parent / "protos"
    for path in ("stopline/v1/operation.proto", "stopline/gateway/v1/gateway_service.proto"):
        text = (protos / path).read_text()
        assert "gateway-<uuid>" in text, path
