"""Hostile input to every RPC of both services, property-based.

Arbitrary and malformed field values (random, huge and unicode ids and strings, garbage page
tokens, negative and huge numbers, unknown enum values, deeply nested Struct input, out-of-range
durations) and raw bytes that are not valid protobuf or carry invalid UTF-8 in string fields.

Every answer must be a deliberate status (never UNKNOWN, never INTERNAL), both servers must still
answer health checks with SERVING afterwards, and a rejected request -- or an accepted one that
may not change anything, like stopping a finished operation -- must leave the stored operations,
events and steps byte-for-byte unchanged.

Gateway calls are made as a caller drawn from `CALL_METADATA`: the seeds' owner (`tester`), or a
wrong principal -- no credentials, a garbage token, an unknown (revoked-looking) key id, a known
key id with the wrong secret, the wrong scheme, or the valid key of another principal (`other`).
Bad credentials are answered UNAUTHENTICATED whatever the request, even bytes that are not
protobuf at all (credentials are checked first); `other` is answered NOT_FOUND for tester's
operations, exactly as for an unknown id, and never sees their data.

The servers run in process, on a background event loop, so the property tests themselves stay
synchronous (hypothesis drives plain functions).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select

from gateway_service.server import RunningGateway, start_gateway
from runtime_service.schema import events as events_table
from runtime_service.schema import operations as operations_table
from runtime_service.schema import steps as steps_table
from runtime_service.server import RunningRuntime, start_runtime
from stopline.gateway.v1 import gateway_service_pb2 as gw_pb
from stopline.transport import bearer_metadata
from stopline.v1 import runtime_service_pb2 as rt_pb
from tests.agents import registry
from tests.conftest import runtime_config
from tests.credentials import (
    OTHER_PRINCIPAL,
    OTHER_TOKEN,
    PRINCIPAL,
    TOKEN,
    runtime_sync_channel,
)
from tests.test_gateway import gateway_config

RT = "/stopline.v1.RuntimeService/"
GW = "/stopline.gateway.v1.GatewayService/"
STREAMING = {RT + "WatchOperation", GW + "StartAndStream", GW + "StreamOperation"}
RUNTIME_METHODS = [
    RT + m
    for m in (
        "StartOperation",
        "GetOperation",
        "ListOperations",
        "InterruptOperation",
        "WatchOperation",
        "ReleaseOperation",
        "StopOperations",
    )
]
GATEWAY_METHODS = [
    GW + m
    for m in (
        "StartAndStream",
        "StreamOperation",
        "StopOperation",
        "GetOperation",
        "ListOperations",
        "StopOperations",
    )
]
# What a deliberate answer to hostile input may be. UNKNOWN means an exception escaped; INTERNAL
# means a bug (it would carry only a reference, never a trace, but it should not happen at all).
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------------ the servers


class Stack:
    """A runtime and a gateway on a private event loop in a thread, and what tests need of them."""

    def __init__(self, workdir: Path) -> None:
        self.db_path = workdir / "runtime.db"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.runtime: RunningRuntime = self.run(
            start_runtime(runtime_config(f"sqlite:///{self.db_path}"), registry())
        )
        # Short hold and small limits so hostile starts are settled quickly and limits are hit.
        self.gateway: RunningGateway = self.run(
            start_gateway(
                gateway_config(self.runtime.address, start_hold_seconds=1.0, max_page_size=50)
            )
        )
        # No credentials on the gateway channel: every call sends its caller's own metadata.
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.rt_channel = runtime_sync_channel(self.runtime.address)
        self._engine = create_engine(f"sqlite:///{self.db_path}")

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=60)

    def close(self) -> None:
        self.channel.close()
        self.rt_channel.close()
        self.run(self.gateway.stop(grace=0))
        self.run(self.runtime.stop(grace=0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._engine.dispose()

    def channel_for(self, method: str) -> grpc.Channel:
        return self.rt_channel if method.startswith(RT) else self.channel

    def snapshot(self) -> list[list[tuple[Any, ...]]]:
        with self._engine.connect() as conn:
            return [
                [tuple(row) for row in conn.execute(select(t).order_by(*t.primary_key.columns))]
                for t in (operations_table, events_table, steps_table)
            ]

    def operation_ids(self) -> set[str]:
        with self._engine.connect() as conn:
            return set(conn.execute(select(operations_table.c.id)).scalars())

    def settle(self, known: set[str]) -> None:
        """Stop whatever a hostile request managed to create, and wait until it has ended (and
        the gateway's background work is done), so the next snapshot is stable."""
        self.run(self.gateway.gateway.settle())
        for op_id in self.operation_ids() - known:
            result = self.run(
                self.runtime.app.operations.interrupt(op_id, "hostile-test", "settling")
            )
            deadline = time.monotonic() + 20
            while not result.operation.status.is_terminal:
                assert time.monotonic() < deadline, f"{op_id} did not end"
                time.sleep(0.01)  # poll interval
                result = type(result)(
                    result.outcome, self.run(self.runtime.app.operations.get(op_id))
                )
        self.run(self.gateway.gateway.settle())

    def healthy(self) -> bool:
        """Both servers answer health SERVING, asked without any credentials."""
        for address in (self.gateway.address, self.runtime.address):
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True


@dataclass(frozen=True)
class Seeds:
    completed: str
    interrupted: str

    def appear_in(self, body: bytes) -> bool:
        return any(op_id.encode() in body for op_id in (self.completed, self.interrupted))

    def named_by(self, method: str, payload: bytes) -> bool:
        """Whether `payload` is a gateway request naming a seed by a valid form of its id."""
        request_type = GATEWAY_BY_ID.get(method)
        if request_type is None:
            return False
        try:
            op_id = request_type.FromString(payload).operation_id
        except Exception:  # not a valid message: the call cannot reach a seed
            return False
        return op_id.lower() in (self.completed, self.interrupted)


@dataclass(frozen=True)
class Caller:
    """Who a gateway call claims to be: `principal` is None for credentials that must fail."""

    label: str
    metadata: tuple[tuple[str, str], ...]
    principal: str | None

    def __repr__(self) -> str:  # hypothesis prints it for a failing example
        return f"Caller({self.label})"


TESTER = Caller("tester", bearer_metadata(TOKEN), PRINCIPAL)
OTHER = Caller("other", bearer_metadata(OTHER_TOKEN), OTHER_PRINCIPAL)
WRONG_CREDENTIALS = [
    Caller("no credentials", (), None),
    Caller("garbage token", bearer_metadata("garbage-0123456789"), None),
    Caller(
        "unknown key id",
        bearer_metadata("stl_deadbeef_revoked-secret-0123456789abcdefghijklmnopqrstuv"),
        None,
    ),
    Caller("tester's key id, wrong secret", bearer_metadata(TOKEN[:-4] + "XXXX"), None),
    Caller("wrong scheme", (("authorization", "Basic " + TOKEN),), None),
    Caller("bare token", (("authorization", TOKEN),), None),
]
GATEWAY_BY_ID: dict[str, Any] = {
    GW + "StreamOperation": gw_pb.StreamOperationRequest,
    GW + "StopOperation": gw_pb.StopOperationRequest,
    GW + "GetOperation": gw_pb.GetOperationRequest,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("hostile"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def seeds(stack: Stack) -> Seeds:
    """Two finished operations of `tester`, so that valid ids reach real rows."""
    ops = stack.runtime.app.operations
    done = stack.run(ops.start("echo", {"x": 1}, "seed-completed", owner=PRINCIPAL))
    held = stack.run(ops.start("ticker", {}, "seed-interrupted", {}, 30.0, owner=PRINCIPAL))
    stack.run(ops.interrupt(held.operation.id, "seed", "seed"))
    deadline = time.monotonic() + 20
    while not stack.run(ops.get(done.operation.id)).status.is_terminal:
        assert time.monotonic() < deadline, "the seed echo never completed"
        time.sleep(0.01)  # poll interval
    return Seeds(done.operation.id, held.operation.id)


# ------------------------------------------------------------------------ calling


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str
    body: bytes = b""
    """The response (unary) or the first message (stream): what the caller got to see."""


def call(stack: Stack, method: str, payload: bytes, caller: Caller = TESTER) -> Answer:
    """Send raw bytes (a serialised request, or garbage) and return the final status; streams are
    read to their end, or cancelled after their first message (an accepted start). Gateway calls
    carry `caller`'s metadata; runtime calls the service credential (on the channel)."""
    channel = stack.channel_for(method)
    metadata = caller.metadata if method.startswith(GW) else ()
    body = b""
    try:
        if method in STREAMING:
            stream = channel.unary_stream(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )(payload, timeout=30, metadata=metadata)
            for first in stream:
                stream.cancel()  # type: ignore[no-untyped-call]  # one message is enough: the request was accepted
                return Answer(grpc.StatusCode.OK, "", first)
            return Answer(grpc.StatusCode.OK, "")
        body = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )(payload, timeout=30, metadata=metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if code is grpc.StatusCode.CANCELLED:
            return Answer(grpc.StatusCode.OK, "", body)  # our own cancel above
        return Answer(code, exc.details() or "")
    return Answer(grpc.StatusCode.OK, "", body)


def check_answer(method: str, answer: Answer, caller: Caller = TESTER) -> None:
    code, details = answer.code, answer.details
    assert "Traceback" not in details and 'File "' not in details, details[:300]
    assert len(details) < 2000, f"{method}: {len(details)}-character message echoes the input"
    if caller.principal is None:
        # Refused before any servicer code runs, whatever the request (even bytes that are not
        # protobuf: credentials are checked before the request is looked at); the message never
        # echoes the credential.
        for _, value in caller.metadata:
            assert value.split()[-1] not in details, details[:300]
        assert code is grpc.StatusCode.UNAUTHENTICATED, (
            f"{method} as {caller.label}: {code.name} {details[:300]!r}"
        )
        assert answer.body == b""
        return
    assert code in DELIBERATE, f"{method} as {caller.label}: {code.name} {details[:300]!r}"


def probe(stack: Stack, method: str, payload: bytes, caller: Caller, seeds: Seeds) -> None:
    """One hostile call: a deliberate answer, never another principal's data, and nothing stored
    changed unless it created an operation (which is then stopped and waited for)."""
    known = stack.operation_ids()
    before = stack.snapshot()
    answer = call(stack, method, payload, caller)
    code = answer.code
    check_answer(method, answer, caller)
    if method.startswith(GW) and caller is not TESTER:
        assert not seeds.appear_in(answer.body), f"{caller.label} saw tester's operation"
        if caller is OTHER and seeds.named_by(method, payload):
            # NOT_FOUND, as for an unknown id; or a field refused before the id is looked up
            # (a reason over its limit, a negative after_seq), also as for an unknown id.
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (
                method,
                code,
                answer.details,
            )
    if stack.operation_ids() != known or method in (RT + "StartOperation", GW + "StartAndStream"):
        stack.settle(known)
        if code is not grpc.StatusCode.OK:
            assert stack.operation_ids() == known, f"{method} failed yet created an operation"
        return
    assert stack.snapshot() == before, f"{method} ({code.name}) changed stored data"


# ------------------------------------------------------------------------ strategies

# Strings protobuf can carry (no lone surrogates: those cannot be encoded at all).
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
huge_texts = st.builds(
    lambda c, n: c * n, st.sampled_from(["x", "é", "😀", "\x00"]), st.integers(0, 200_000)
)
any_text = st.one_of(texts, huge_texts, st.sampled_from(["", " ", "' OR 1=1 --", "../../etc"]))
int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
json_leaves = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), texts
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"n": value}
    return value


def to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


structs = st.one_of(
    st.dictionaries(texts, json_values, max_size=5),
    st.integers(1, 32).map(nested),  # the deepest protobuf builds; deeper: deep_start_request
    st.builds(lambda n: {"blob": "x" * n}, st.integers(0, 100_000)),
).map(to_struct)
durations = st.builds(
    lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
    st.one_of(int64s, st.integers(-100, 100_000)),
    st.one_of(int32s, st.integers(0, 999_999_999)),
)


def ids(seeds: Seeds) -> st.SearchStrategy[str]:
    return st.one_of(
        any_text,
        st.uuids().map(str),
        st.sampled_from([seeds.completed, seeds.interrupted, seeds.completed.upper()]),
    )


agents = st.one_of(any_text, st.sampled_from(["echo", "ticker", "ECHO", "echo\x00"]))
page_tokens = st.one_of(any_text, st.binary(max_size=60).map(lambda b: b.hex()))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    key, size = (number << 3) | 2, len(payload)
    length = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([key]) + bytes(length) + payload


def deep_start_request(depth: int) -> bytes:
    """A start request (agent "echo", field 1; input, field 2, in both services' messages) whose
    Struct is nested `depth` levels deep: past protobuf's parse limit of 100, which the Python
    library also enforces when building such a message, so it is written by hand."""
    struct = b""
    for _ in range(depth):
        value = _field(5, struct)  # Value.struct_value
        struct = _field(1, _field(1, b"n") + _field(2, value))  # Struct.fields entry "n"
    return _field(1, b"echo") + _field(2, struct)


raw_bytes = st.one_of(
    st.binary(max_size=300),
    # field 1 (a string in every request) holding bytes that are not UTF-8
    st.binary(min_size=1, max_size=40).map(lambda b: b"\x0a" + bytes([len(b) + 1]) + b"\xff" + b),
    # a length prefix that runs past the end of the message
    st.just(b"\x0a\xff\xff\xff\x0f"),
    st.integers(1, 300).map(deep_start_request),
)


# Half the calls as the seeds' owner, so hostile fields still reach the servicer; the rest as
# another principal or with credentials that must fail.
CALL_METADATA: st.SearchStrategy[Caller] = st.one_of(
    st.just(TESTER), st.sampled_from([OTHER, *WRONG_CREDENTIALS])
)


def runtime_requests(seeds: Seeds) -> st.SearchStrategy[tuple[str, bytes]]:
    op_id = ids(seeds)
    requests: list[st.SearchStrategy[tuple[str, Any]]] = [
        st.builds(
            lambda a, i, k, labels, h, use_hold: (
                "StartOperation",
                rt_pb.StartOperationRequest(
                    agent=a, input=i, idempotency_key=k, labels=labels, hold=h if use_hold else None
                ),
            ),
            agents,
            structs,
            any_text,
            st.dictionaries(any_text, any_text, max_size=40),
            durations,
            st.booleans(),
        ),
        st.builds(lambda i: ("GetOperation", rt_pb.GetOperationRequest(operation_id=i)), op_id),
        st.builds(
            lambda s, n, t: (
                "ListOperations",
                rt_pb.ListOperationsRequest(status=s, page_size=n, page_token=t),
            ),
            int32s,
            int32s,
            page_tokens,
        ),
        st.builds(
            lambda o, s, a, labels: (
                "StopOperations",
                rt_pb.StopOperationsRequest(owner=o, status=s, agent=a, labels=labels),
            ),
            any_text,
            int32s,
            any_text,
            st.dictionaries(any_text, any_text, max_size=40),
        ),
        st.builds(
            lambda i, by, why, only: (
                "InterruptOperation",
                rt_pb.InterruptOperationRequest(
                    operation_id=i, requested_by=by, reason=why, only_if_unwatched=only
                ),
            ),
            op_id,
            any_text,
            any_text,
            st.booleans(),
        ),
        st.builds(
            lambda i, after: (
                "WatchOperation",
                rt_pb.WatchOperationRequest(operation_id=i, after_seq=after),
            ),
            op_id,
            int64s,
        ),
        st.builds(
            lambda i: ("ReleaseOperation", rt_pb.ReleaseOperationRequest(operation_id=i)), op_id
        ),
    ]
    return st.one_of(requests).map(lambda pair: (RT + pair[0], pair[1].SerializeToString()))


def gateway_requests(seeds: Seeds) -> st.SearchStrategy[tuple[str, bytes]]:
    op_id = ids(seeds)
    requests: list[st.SearchStrategy[tuple[str, Any]]] = [
        st.builds(
            lambda a, i, k, p, g, use_grace: (
                "StartAndStream",
                gw_pb.StartAndStreamRequest(
                    agent=a,
                    input=i,
                    idempotency_key=k,
                    cancel_policy=p,
                    cancel_grace=g if use_grace else None,
                ),
            ),
            agents,
            structs,
            any_text,
            int32s,
            durations,
            st.booleans(),
        ),
        st.builds(
            lambda i, after: (
                "StreamOperation",
                gw_pb.StreamOperationRequest(operation_id=i, after_seq=after),
            ),
            op_id,
            int64s,
        ),
        st.builds(
            lambda i, why: (
                "StopOperation",
                gw_pb.StopOperationRequest(operation_id=i, reason=why),
            ),
            op_id,
            any_text,
        ),
        st.builds(lambda i: ("GetOperation", gw_pb.GetOperationRequest(operation_id=i)), op_id),
        st.builds(
            lambda s, n, t: (
                "ListOperations",
                gw_pb.ListOperationsRequest(status=s, page_size=n, page_token=t),
            ),
            int32s,
            int32s,
            page_tokens,
        ),
        st.builds(
            lambda s, a, labels: (
                "StopOperations",
                gw_pb.StopOperationsRequest(status=s, agent=a, labels=labels),
            ),
            int32s,
            any_text,
            st.dictionaries(any_text, any_text, max_size=40),
        ),
    ]
    return st.one_of(requests).map(lambda pair: (GW + pair[0], pair[1].SerializeToString()))


# ------------------------------------------------------------------------ the properties


@EXAMPLES
@given(data=st.data())
def test_runtime_answers_hostile_fields_deliberately(
    stack: Stack, seeds: Seeds, data: st.DataObject
) -> None:
    method, payload = data.draw(runtime_requests(seeds))
    probe(stack, method, payload, TESTER, seeds)


@EXAMPLES
@given(data=st.data())
def test_gateway_answers_hostile_fields_deliberately(
    stack: Stack, seeds: Seeds, data: st.DataObject
) -> None:
    method, payload = data.draw(gateway_requests(seeds))
    probe(stack, method, payload, data.draw(CALL_METADATA), seeds)


@EXAMPLES
@given(method=st.sampled_from(RUNTIME_METHODS + GATEWAY_METHODS), payload=raw_bytes, data=st.data())
def test_raw_bytes_get_a_deliberate_status(
    stack: Stack, seeds: Seeds, method: str, payload: bytes, data: st.DataObject
) -> None:
    caller = data.draw(CALL_METADATA) if method.startswith(GW) else TESTER
    probe(stack, method, payload, caller, seeds)


@pytest.mark.parametrize("method", [RT + "StartOperation", GW + "StartAndStream"])
def test_input_nested_past_protobufs_limit_is_invalid_argument(stack: Stack, method: str) -> None:
    known = stack.operation_ids()
    before = stack.snapshot()
    for depth in (33, 40, 48, 49, 50, 101, 1000):  # 32 levels is the most input may nest
        answer = call(stack, method, deep_start_request(depth))
        assert answer.code is grpc.StatusCode.INVALID_ARGUMENT, (depth, answer)
        # The documented message, in the caller's terms, not protobuf's decoder's.
        assert answer.details.startswith("input: is nested "), (depth, answer)
        assert answer.details.endswith("deep; the limit is 32 levels"), (depth, answer)
    assert stack.operation_ids() == known and stack.snapshot() == before


@pytest.mark.parametrize("method", RUNTIME_METHODS + GATEWAY_METHODS)
def test_invalid_utf8_and_corrupt_wire_format_are_invalid_argument(
    stack: Stack, seeds: Seeds, method: str
) -> None:
    # Field 1 is a string in every request but ListOperations, whose page_token is field 3, and
    # the gateway's StopOperations, whose agent is field 2.
    bad_utf8 = b"\x0a\x03\xff\xfe\xfd"
    if method.endswith("/ListOperations"):
        bad_utf8 = b"\x1a\x03\xff\xfe\xfd"
    elif method == GW + "StopOperations":
        bad_utf8 = b"\x12\x03\xff\xfe\xfd"
    for payload in (bad_utf8, b"\xff\xff\xff", b"\x0a\xff\xff\xff\x0f"):
        answer = call(stack, method, payload)
        assert answer.code is grpc.StatusCode.INVALID_ARGUMENT, (method, answer)
        assert answer.details.startswith("request: is not a valid "), answer.details


def _seed_requests(seeds: Seeds) -> list[tuple[str, bytes]]:
    """A well-formed request of every gateway method, naming a seed where it takes an id."""
    return [
        (GW + "StartAndStream", gw_pb.StartAndStreamRequest(agent="echo").SerializeToString()),
        (GW + "ListOperations", gw_pb.ListOperationsRequest().SerializeToString()),
        *(
            (method, request_type(operation_id=op_id).SerializeToString())
            for method, request_type in GATEWAY_BY_ID.items()
            for op_id in (seeds.completed, seeds.interrupted.upper())
        ),
    ]


@pytest.mark.parametrize("caller", WRONG_CREDENTIALS, ids=lambda c: c.label)
def test_wrong_credentials_are_unauthenticated_on_every_gateway_method(
    stack: Stack, seeds: Seeds, caller: Caller
) -> None:
    known = stack.operation_ids()
    before = stack.snapshot()
    for method, payload in _seed_requests(seeds):
        answer = call(stack, method, payload, caller)
        assert answer.code is grpc.StatusCode.UNAUTHENTICATED, (method, answer)
        assert answer.body == b""
    assert stack.operation_ids() == known and stack.snapshot() == before


def test_another_principal_gets_not_found_for_tester_operations(stack: Stack, seeds: Seeds) -> None:
    known = stack.operation_ids()
    before = stack.snapshot()
    for method, request_type in GATEWAY_BY_ID.items():
        for op_id in (seeds.completed, seeds.interrupted, seeds.completed.upper()):
            payload = request_type(operation_id=op_id).SerializeToString()
            answer = call(stack, method, payload, OTHER)
            # Exactly what an unknown id gets: nothing tells other that the operation exists.
            assert answer.code is grpc.StatusCode.NOT_FOUND, (method, answer)
            assert answer.details == f"operation {op_id.lower()} does not exist"
            assert answer.body == b""
            # The owner reaches the same operation (GetOperation and a finished operation's
            # stream and stop change nothing).
            assert call(stack, method, payload, TESTER).code is grpc.StatusCode.OK
    listed = call(
        stack, GW + "ListOperations", gw_pb.ListOperationsRequest().SerializeToString(), OTHER
    )
    assert listed.code is grpc.StatusCode.OK
    page = gw_pb.ListOperationsResponse.FromString(listed.body)
    assert all(o.owner == OTHER_PRINCIPAL for o in page.operations)
    assert not seeds.appear_in(listed.body)
    assert stack.operation_ids() == known and stack.snapshot() == before


def test_servers_are_healthy_and_seeds_untouched_after_the_hostile_run(
    stack: Stack, seeds: Seeds
) -> None:
    assert stack.healthy()
    completed = stack.run(stack.runtime.app.operations.get(seeds.completed))
    interrupted = stack.run(stack.runtime.app.operations.get(seeds.interrupted))
    assert completed.status.value == "COMPLETED" and interrupted.status.value == "INTERRUPTED"
    assert completed.input == {"x": 1}
