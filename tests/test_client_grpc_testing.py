"""The synchronous RuntimeClient driven through grpcio-testing's fake channel.

grpcio-testing can play the server side for synchronous client code, so these tests check the
client's requests and its translation of answers and errors without any server or network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import grpc
import grpc_testing
import pytest

from runtime_service.client import ClientError, RuntimeClient
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["RuntimeService"]
OP_ID = "3f2b1c4d-0000-4000-8000-000000000001"
T = TypeVar("T")


class Call:
    """Runs a blocking client call in a thread while the test plays the server."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.result: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self) -> object:
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "client call did not return"
        return self.result


@pytest.fixture
def channel() -> grpc_testing.Channel:
    return grpc_testing.channel([pb.DESCRIPTOR], grpc_testing.strict_real_time())


def test_start_sends_agent_input_and_key(channel: grpc_testing.Channel) -> None:
    client = RuntimeClient(channel)
    call = Call(lambda: client.start("ticker", {"steps": 2}, "key-7"))
    _, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name["StartOperation"])
    assert request.agent == "ticker" and request.idempotency_key == "key-7"
    assert dict(request.input) == {"steps": 2.0}
    reply = pb.StartOperationResponse(operation=op_pb.Operation(id=OP_ID), created=True)
    rpc.terminate(reply, (), grpc.StatusCode.OK, "")
    assert call.join() == reply


def test_server_errors_become_client_errors_with_code_and_details(
    channel: grpc_testing.Channel,
) -> None:
    client = RuntimeClient(channel)
    call = Call(lambda: client.get("not-an-id"))
    _, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name["GetOperation"])
    assert request.operation_id == "not-an-id"
    rpc.terminate(
        pb.GetOperationResponse(), (), grpc.StatusCode.INVALID_ARGUMENT, "operation_id: bad"
    )
    call.join()
    assert isinstance(call.error, ClientError)
    assert call.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert call.error.details == "operation_id: bad"


def test_interrupt_reports_outcome(channel: grpc_testing.Channel) -> None:
    client = RuntimeClient(channel)
    call = Call(lambda: client.interrupt(OP_ID, "cli", "because"))
    _, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name["InterruptOperation"])
    assert (request.operation_id, request.requested_by, request.reason) == (OP_ID, "cli", "because")
    reply = pb.InterruptOperationResponse(
        outcome=pb.INTERRUPT_OUTCOME_ALREADY_FINISHED,
        operation=op_pb.Operation(id=OP_ID, status=op_pb.OPERATION_STATUS_COMPLETED),
    )
    rpc.terminate(reply, (), grpc.StatusCode.OK, "")
    assert call.join() == reply


def test_watch_yields_events_until_the_stream_ends(channel: grpc_testing.Channel) -> None:
    client = RuntimeClient(channel)
    call = Call(lambda: [e.seq for e in client.watch(OP_ID, after_seq=3)])
    _, request, rpc = channel.take_unary_stream(SERVICE.methods_by_name["WatchOperation"])
    assert request.operation_id == OP_ID and request.after_seq == 3
    for seq in (4, 5, 6):
        rpc.send_response(pb.WatchOperationResponse(event=op_pb.Event(operation_id=OP_ID, seq=seq)))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert call.join() == [4, 5, 6]


def test_watch_error_mid_stream_is_raised_after_delivered_events(
    channel: grpc_testing.Channel,
) -> None:
    client = RuntimeClient(channel)
    received: list[int] = []
    got_first = threading.Event()

    def consume() -> None:
        for event in client.watch(OP_ID):
            received.append(event.seq)
            got_first.set()

    call = Call(consume)
    _, _, rpc = channel.take_unary_stream(SERVICE.methods_by_name["WatchOperation"])
    rpc.send_response(pb.WatchOperationResponse(event=op_pb.Event(seq=1)))
    assert got_first.wait(timeout=10)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry shortly")
    call.join()
    assert received == [1]
    assert isinstance(call.error, ClientError)
    assert call.error.code == grpc.StatusCode.UNAVAILABLE
