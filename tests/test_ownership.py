"""Identity over gRPC: who may call the gateway and the runtime, and whose operations they reach."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import jwt
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_service.auth import AuthConfigError, AuthSettings, JwtSettings
from gateway_service.config import GatewayConfig
from gateway_service.keys import ApiKey
from gateway_service.server import RunningGateway, start_gateway
from runtime_service.server import RunningRuntime, start_runtime
from runtime_service.trust import TrustConfigError
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import registry
from tests.conftest import runtime_config
from tests.credentials import (
    KEYS,
    OTHER_PRINCIPAL,
    OTHER_TOKEN,
    PRINCIPAL,
    TOKEN,
    gateway_channel,
    runtime_channel,
)
from tests.test_gateway import TICKER_30S, gateway_config, read_until, start_request

SECRET = "jwt-secret-for-the-ownership-tests-0123"
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
Stub = Any


@pytest.fixture
async def gateway(runtime: RunningRuntime) -> AsyncIterator[RunningGateway]:
    revoked = ApiKey("0dead0ff", "mallory", "0" * 64, revoked=True)
    auth = AuthSettings(
        keys=(*KEYS, revoked), jwt=JwtSettings("https://issuer.test", "stopline", SECRET)
    )
    # These tests check who may stop, and assert DELIVERED: a loaded CI machine gets time to
    # answer (the acknowledgment's timeout has tests of its own in test_gateway.py).
    running = await start_gateway(gateway_config(runtime.address, auth=auth, stop_ack_seconds=10))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def mine(gateway: RunningGateway) -> AsyncIterator[Stub]:
    async with gateway_channel(gateway.address, TOKEN) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


@pytest.fixture
async def theirs(gateway: RunningGateway) -> AsyncIterator[Stub]:
    async with gateway_channel(gateway.address, OTHER_TOKEN) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


async def failure(call: Any) -> aio.AioRpcError:
    """The error a unary or streaming call ends with."""

    async def run() -> None:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result

    with pytest.raises(aio.AioRpcError) as err:
        await run()
    return err.value


def answer(exc: aio.AioRpcError, operation_id: str) -> tuple[grpc.StatusCode, str, Any]:
    """What the caller learns, with the id it asked about replaced by a placeholder."""
    return exc.code(), (exc.details() or "").replace(operation_id, "<id>"), exc.trailing_metadata()


async def started(stub: Stub, policy: int = pb.CANCEL_POLICY_KEEP_RUNNING) -> str:
    call = stub.StartAndStream(start_request("ticker", TICKER_30S, policy))
    first = await read_until(call, lambda u: u.HasField("accepted"))
    call.cancel()
    return str(first[0].accepted.operation_id)


def token_jwt(**claims: Any) -> str:
    now = int(time.time())
    values = {"iss": "https://issuer.test", "aud": "stopline", "sub": "jwt-user", "exp": now + 60}
    values.update(claims)
    return jwt.encode(values, SECRET, algorithm="HS256")


# ---------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (lambda: None, "missing credentials"),
        (lambda: "stl_7e57c0de_wrong-secret", "invalid API key"),
        (lambda: "stl_0dead0ff_revoked-key-secret", "invalid API key"),
        (lambda: token_jwt(exp=int(time.time()) - 600), "expired"),
        (lambda: token_jwt(iss="https://other.test"), "issuer"),
        (lambda: token_jwt(aud="elsewhere"), "audience"),
        (
            lambda: jwt.encode({"sub": "x"}, "a-different-secret-of-32-bytes-long!", "HS256"),
            "signature",
        ),
    ],
    ids=["none", "wrong-key", "revoked", "expired", "issuer", "audience", "signature"],
)
async def test_bad_credentials_are_unauthenticated_on_every_rpc(
    gateway: RunningGateway, make_token: Callable[[], str | None], message: str
) -> None:
    # Tokens are made here, not when tests are collected: a JWT made a minute earlier would
    # have expired by the time a long suite reaches this test (and fail for the wrong reason).
    async with gateway_channel(gateway.address, make_token()) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        calls = [
            lambda: stub.StartAndStream(start_request("echo")),
            lambda: stub.StreamOperation(pb.StreamOperationRequest(operation_id=UNKNOWN_ID)),
            lambda: stub.StopOperation(pb.StopOperationRequest(operation_id=UNKNOWN_ID)),
            lambda: stub.GetOperation(pb.GetOperationRequest(operation_id=UNKNOWN_ID)),
            lambda: stub.ListOperations(pb.ListOperationsRequest()),
        ]
        for call in calls:
            exc = await failure(call)
            assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
            assert message in (exc.details() or "")
            assert "tester" not in (exc.details() or "")  # no principal or key is named


async def test_a_valid_jwt_is_a_principal_of_its_own(gateway: RunningGateway, mine: Stub) -> None:
    async with gateway_channel(gateway.address, token_jwt()) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        op_id = await started(stub)
        reply = await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))
        assert reply.operation.owner == "jwt-user"
    exc = await failure(lambda: mine.GetOperation(pb.GetOperationRequest(operation_id=op_id)))
    assert exc.code() is grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_need_no_credentials(gateway: RunningGateway) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    async with aio.insecure_channel(gateway.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def reflect() -> list[str]:
        with grpc.insecure_channel(gateway.address) as channel:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert "stopline.gateway.v1.GatewayService" in await asyncio.to_thread(reflect)


async def test_reflection_can_be_switched_off(runtime: RunningRuntime) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    quiet = await start_gateway(gateway_config(runtime.address, reflection=False))
    try:

        def reflect() -> list[str]:
            with grpc.insecure_channel(quiet.address) as channel:
                return list(ProtoReflectionDescriptorDatabase(channel).get_services())

        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(reflect)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await quiet.stop(grace=0)


async def test_a_gateway_without_credentials_refuses_to_start(runtime: RunningRuntime) -> None:
    with pytest.raises(AuthConfigError, match="no credentials configured"):
        await start_gateway(GatewayConfig(address="127.0.0.1:0", runtime_address=runtime.address))


# ---------------------------------------------------------------------------- ownership


async def test_each_principal_reaches_only_its_own_operations(
    mine: Stub, theirs: Stub, runtime: RunningRuntime
) -> None:
    my_op = await started(mine)
    their_op = await started(theirs)

    mine_listed = await mine.ListOperations(pb.ListOperationsRequest())
    theirs_listed = await theirs.ListOperations(pb.ListOperationsRequest())
    assert [o.id for o in mine_listed.operations] == [my_op]
    assert [o.id for o in theirs_listed.operations] == [their_op]
    assert mine_listed.operations[0].owner == PRINCIPAL
    assert theirs_listed.operations[0].owner == OTHER_PRINCIPAL

    # Another principal's id answers exactly like an id that does not exist.
    calls = {
        "get": lambda stub, op_id: stub.GetOperation(pb.GetOperationRequest(operation_id=op_id)),
        "stream": lambda stub, op_id: stub.StreamOperation(
            pb.StreamOperationRequest(operation_id=op_id)
        ),
        "stop": lambda stub, op_id: stub.StopOperation(
            pb.StopOperationRequest(operation_id=op_id, reason="not yours")
        ),
    }
    for name, call in calls.items():
        foreign = await failure(lambda call=call: call(theirs, my_op))
        unknown = await failure(lambda call=call: call(theirs, UNKNOWN_ID))
        assert foreign.code() is grpc.StatusCode.NOT_FOUND, name
        assert answer(foreign, my_op) == answer(unknown, UNKNOWN_ID), name

    # The foreign stop changed nothing: still running, no stop recorded.
    stored = await runtime.app.operations.get(my_op)
    assert stored.stop is None and not stored.status.is_terminal
    # The owner can do all of it.
    got = await mine.GetOperation(pb.GetOperationRequest(operation_id=my_op))
    assert got.operation.id == my_op
    stopped = await mine.StopOperation(pb.StopOperationRequest(operation_id=my_op))
    assert stopped.delivery == pb.STOP_DELIVERY_DELIVERED
    updates = [u async for u in mine.StreamOperation(pb.StreamOperationRequest(operation_id=my_op))]
    assert updates[-1].event.WhichOneof("kind") == "interrupted"
    await theirs.StopOperation(pb.StopOperationRequest(operation_id=their_op))


async def test_a_foreign_stop_never_reaches_the_owners_stream(mine: Stub, theirs: Stub) -> None:
    call = mine.StartAndStream(start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_STOP))
    first = await read_until(call, lambda u: u.HasField("accepted"))
    op_id = first[0].accepted.operation_id
    exc = await failure(lambda: theirs.StopOperation(pb.StopOperationRequest(operation_id=op_id)))
    assert exc.code() is grpc.StatusCode.NOT_FOUND
    await mine.StopOperation(pb.StopOperationRequest(operation_id=op_id, reason="mine"))
    rest = await read_until(call, lambda u: u.HasField("event") and u.event.HasField("interrupted"))
    notices = [u.stop_requested for u in rest if u.HasField("stop_requested")]
    assert [n.reason for n in notices] == ["mine"]  # the foreign attempt left no notice


async def test_a_gateway_that_never_saw_the_operation_stops_it_for_its_owner_only(
    gateway: RunningGateway, mine: Stub, runtime: RunningRuntime
) -> None:
    """A stop through another gateway replica (one that did not start the operation, so does
    not know its owner) reads nothing first: the runtime checks the owner in the stop's own
    write. Anyone else's stop is answered like an unknown id and changes nothing."""
    call = mine.StartAndStream(start_request("ticker", TICKER_30S, pb.CANCEL_POLICY_STOP))
    first = await read_until(call, lambda u: u.HasField("accepted"))
    op_id = first[0].accepted.operation_id
    other = await start_gateway(
        gateway_config(runtime.address, auth=AuthSettings(keys=KEYS), stop_ack_seconds=10)
    )
    reads: list[str] = []
    real_get = other.gateway.link.get

    async def counted_get(operation_id: str) -> Any:
        reads.append(operation_id)
        return await real_get(operation_id)

    other.gateway.link.get = counted_get  # type: ignore[method-assign]
    try:
        async with (
            gateway_channel(other.address, TOKEN) as mine_channel,
            gateway_channel(other.address, OTHER_TOKEN) as theirs_channel,
        ):
            mine_there = pb_grpc.GatewayServiceStub(mine_channel)
            theirs_there = pb_grpc.GatewayServiceStub(theirs_channel)
            foreign = await failure(
                lambda: theirs_there.StopOperation(pb.StopOperationRequest(operation_id=op_id))
            )
            unknown = await failure(
                lambda: theirs_there.StopOperation(pb.StopOperationRequest(operation_id=UNKNOWN_ID))
            )
            assert foreign.code() is grpc.StatusCode.NOT_FOUND
            assert answer(foreign, op_id) == answer(unknown, UNKNOWN_ID)
            stored = await runtime.app.operations.get(op_id)
            assert stored.stop is None and not stored.status.is_terminal
            # Refused for that principal from now on, without asking the runtime again.
            assert (
                await failure(
                    lambda: theirs_there.StopOperation(pb.StopOperationRequest(operation_id=op_id))
                )
            ).code() is grpc.StatusCode.NOT_FOUND

            stopped = await mine_there.StopOperation(
                pb.StopOperationRequest(operation_id=op_id, reason="from elsewhere")
            )
            assert stopped.delivery == pb.STOP_DELIVERY_DELIVERED
            assert stopped.outcome == rt_pb.INTERRUPT_OUTCOME_ACCEPTED
            assert stopped.operation.owner == PRINCIPAL
        assert reads == []  # no read before any of the stops
        rest = await read_until(
            call, lambda u: u.HasField("event") and u.event.HasField("interrupted")
        )
        # The owner's stream (on the first gateway) sees the stop the runtime recorded, once.
        stops = [
            u.event.stop_requested.reason
            for u in rest
            if u.HasField("event") and u.event.HasField("stop_requested")
        ]
        assert stops == ["from elsewhere"]
        assert not any(u.HasField("stop_requested") for u in rest)  # no notice of this gateway
    finally:
        await other.stop(grace=0)


async def test_idempotency_keys_are_scoped_per_principal(mine: Stub, theirs: Stub) -> None:
    async def start_with_key(stub: Stub) -> pb.OperationAccepted:
        request = start_request("echo")
        request.idempotency_key = "same-key"
        updates = [u async for u in stub.StartAndStream(request)]
        accepted: pb.OperationAccepted = updates[0].accepted
        return accepted

    my_first, their_first = await start_with_key(mine), await start_with_key(theirs)
    assert my_first.operation_id != their_first.operation_id
    assert my_first.operation.idempotency_key == their_first.operation.idempotency_key
    assert (await start_with_key(mine)).operation_id == my_first.operation_id


# ---------------------------------------------------------------------------- the runtime


@pytest.mark.parametrize("token", [None, "not-the-service-credential-0000"])
async def test_the_runtime_refuses_callers_without_the_service_credential(
    runtime: RunningRuntime, token: str | None
) -> None:
    async with runtime_channel(runtime.address, token) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        for call in (
            lambda: stub.StartOperation(rt_pb.StartOperationRequest(agent="echo")),
            lambda: stub.ListOperations(rt_pb.ListOperationsRequest()),
            lambda: stub.WatchOperation(rt_pb.WatchOperationRequest(operation_id=UNKNOWN_ID)),
        ):
            exc = await failure(call)
            assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "service credential" in (exc.details() or "")
    assert await runtime.app.operations.list(None, 0, "") == ([], "")


async def test_the_runtime_filters_by_owner(stub: rt_grpc.RuntimeServiceAsyncStub) -> None:
    for owner in ("a", "b", ""):
        await stub.StartOperation(rt_pb.StartOperationRequest(agent="echo", owner=owner))
    only_a = await stub.ListOperations(rt_pb.ListOperationsRequest(owner="a"))
    assert [o.owner for o in only_a.operations] == ["a"]
    everyone = await stub.ListOperations(rt_pb.ListOperationsRequest())
    assert sorted(o.owner for o in everyone.operations) == ["", "a", "b"]
    too_long = await failure(
        lambda: stub.StartOperation(rt_pb.StartOperationRequest(agent="echo", owner="x" * 201))
    )
    assert too_long.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (too_long.details() or "").startswith("owner:")


async def test_a_runtime_that_would_serve_anyone_refuses_to_start(sqlite_url: str) -> None:
    with pytest.raises(TrustConfigError, match="insecure-allow-any-caller"):
        await start_runtime(runtime_config(sqlite_url, service_tokens=()), registry())
    anyone = await start_runtime(
        runtime_config(sqlite_url, service_tokens=(), allow_any_caller=True), registry()
    )
    try:
        async with aio.insecure_channel(anyone.address) as channel:
            reply = await rt_grpc.RuntimeServiceStub(channel).ListOperations(
                rt_pb.ListOperationsRequest()
            )
        assert list(reply.operations) == []
    finally:
        await anyone.stop(grace=0)
