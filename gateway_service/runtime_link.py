"""The gateway's connection to the runtime: one channel with keepalive and a load-balancing
policy over the runtime replicas, errors as UpstreamError."""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import wait_exponential_jitter

from gateway_service.replicas import Replicas
from stopline import tracing
from stopline.grpc_status import UpstreamError
from stopline.transport import ClientTLS, bearer_metadata, open_channel
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc

T = TypeVar("T")
RUNTIME_SERVICE = rt_pb.DESCRIPTOR.services_by_name["RuntimeService"].full_name

# Keepalive finds a dead or frozen runtime connection within about 3 s (a ping every second, 2 s
# to answer it) instead of at the next TCP timeout: the calls on it (watches, stops) fail with
# UNAVAILABLE and are retried on another replica. gRPC enforces the answer time of a ping already
# in flight with ping_timeout_ms (default: a minute), not keepalive_timeout_ms, so both are set.
# Pings are answered by gRPC's own threads, so a busy runtime still answers in time; the
# runtime's server options accept pings this often (stopline/serving.py). A short reconnect
# backoff picks a restarted runtime up quickly.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 1_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.http2.ping_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


async def _answer(call: Awaitable[T], on_answer: Callable[[T], None] | None = None) -> T:
    """A unary call's response; its failure as UpstreamError. `on_answer` is given the
    response in the turn of the loop it arrives in, before this returns."""
    try:
        response = await call
    except aio.AioRpcError as exc:
        raise UpstreamError.from_rpc_error(exc) from exc
    if on_answer is not None:
        on_answer(response)
    return response


class LoadBalancing(enum.StrEnum):
    """How the gateway spreads calls over the addresses its runtime target resolves to (a list
    `ipv4:10.0.0.5:50051,10.0.0.6:50051`, or a DNS name with one A record per replica)."""

    # Every call to one replica (the first that connects); the others only when it fails.
    PICK_FIRST = "pick_first"
    # Each call to the next connected replica: starts, stops and watches are spread, and a
    # replica that stops answering leaves the rotation once keepalive finds it gone.
    ROUND_ROBIN = "round_robin"

    def channel_options(self) -> list[tuple[str, Any]]:
        """The policy, set as the channel's default service config."""
        config: dict[str, Any] = {"loadBalancingConfig": [{self.value: {}}]}
        return [("grpc.service_config", json.dumps(config))]


# What a retry can fix: the runtime was unreachable, restarting, or too slow to answer in time.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.code in RETRYABLE


def backoff(max_seconds: float) -> wait_exponential_jitter:
    """Retry waits: 50 ms doubling up to `max_seconds`, plus up to 50 ms of jitter so that many
    clients of a restarted runtime do not retry in lockstep."""
    return wait_exponential_jitter(multiplier=0.05, max=max_seconds, jitter=0.05)


class RuntimeLink:
    def __init__(
        self,
        address: str,
        rpc_timeout: float,
        token: str | None = None,
        tls: ClientTLS | None = None,
        *,
        load_balancing: LoadBalancing,
        route_capacity: int = 100_000,
    ) -> None:
        self.address = address
        # The service credential goes with every call; the runtime refuses calls without it.
        # Passed per call, not by a client interceptor: gRPC's aio interceptors cost about
        # 150 µs per unary call and 10 µs per streamed message (a stop's acknowledgment pays it).
        self._metadata = bearer_metadata(token) if token else None
        options = [*CHANNEL_OPTIONS, *load_balancing.channel_options()]
        self._channel = open_channel(address, None, tls, options)
        self._stub = rt_grpc.RuntimeServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = rpc_timeout
        # Channels of their own to the replicas that name themselves (see replicas.py): the
        # same credentials, one address each.
        self.replicas = Replicas(
            lambda replica: open_channel(replica, None, tls, CHANNEL_OPTIONS), route_capacity
        )

    async def close(self) -> None:
        await self.replicas.close()
        await self._channel.close(grace=None)

    def _routed(self, operation_id: str) -> rt_grpc.RuntimeServiceAsyncStub:
        """The stub of the replica running the operation when it is known and connected, else
        the load-balanced one."""
        return self.replicas.stub(operation_id) or self._stub

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, deadline: float) -> T:
        metadata = tracing.outgoing_metadata(self._metadata)
        return await _answer(method(request, timeout=deadline, metadata=metadata))

    async def start_and_watch(self, request: rt_pb.StartOperationRequest) -> WatchedStart:
        """A start (held or not) and its watch on one call, once the start's answer (the
        stream's first message) has arrived; UpstreamError when the call fails before,
        DEADLINE_EXCEEDED when that answer takes longer than a unary call may."""
        call = self._stub.StartAndWatchOperation(
            rt_pb.StartAndWatchOperationRequest(start=request),
            metadata=tracing.outgoing_metadata(self._metadata),
        )
        messages = call.__aiter__()
        try:
            async with asyncio.timeout(self._timeout):
                first = await anext(messages)
        except TimeoutError:
            call.cancel()
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"StartAndWatchOperation sent no answer in {self._timeout:g}s",
            ) from None
        except StopAsyncIteration:
            raise UpstreamError(
                grpc.StatusCode.UNAVAILABLE, "the runtime ended the start's stream unanswered"
            ) from None
        except aio.AioRpcError as exc:
            call.cancel()
            raise _stream_error(exc) from exc
        except BaseException:
            call.cancel()  # cancelled while waiting: the call must not outlive its caller
            raise
        # Sent with the first message, so already here.
        self.replicas.learn(first.started.operation.id, await call.initial_metadata())
        return WatchedStart(call, messages, first.started)

    async def release(self, operation_id: str, routed: bool = True) -> None:
        """`routed`: to the replica that streams the operation, where known (it then runs it
        there, with no hop between replicas for its events); else to any."""
        request = rt_pb.ReleaseOperationRequest(operation_id=operation_id)
        stub = self._routed(operation_id) if routed else self._stub
        await self._unary(stub.ReleaseOperation, request, self._timeout)

    def interrupt_now(
        self,
        request: rt_pb.InterruptOperationRequest,
        deadline_seconds: float,
        routed: bool = False,
        on_answer: Callable[[rt_pb.InterruptOperationResponse], None] | None = None,
    ) -> asyncio.Future[rt_pb.InterruptOperationResponse]:
        """InterruptOperation, begun before this returns: gRPC sends the request from a task of
        its own, scheduled here, so it leaves at the loop's next turn, ahead of whatever the
        caller schedules after this call (a stop's notices to its streams). Made from inside a
        coroutine of the caller's instead, it went out a turn or two later, behind them.
        `routed`: to the replica running the operation, where known; else to any.
        `on_answer`: given the answer as it arrives (a turn before the future's callbacks)."""
        metadata = tracing.outgoing_metadata(self._metadata)
        stub = self._routed(request.operation_id) if routed else self._stub
        call = stub.InterruptOperation(request, timeout=deadline_seconds, metadata=metadata)
        return asyncio.ensure_future(_answer(call, on_answer))

    async def get(self, operation_id: str) -> rt_pb.GetOperationResponse:
        request = rt_pb.GetOperationRequest(operation_id=operation_id)
        return await self._unary(self._stub.GetOperation, request, self._timeout)

    async def list(self, request: rt_pb.ListOperationsRequest) -> rt_pb.ListOperationsResponse:
        return await self._unary(self._stub.ListOperations, request, self._timeout)

    async def stop_matching(
        self, request: rt_pb.StopOperationsRequest
    ) -> rt_pb.StopOperationsResponse:
        return await self._unary(self._stub.StopOperations, request, self._timeout)

    async def answer(self, request: rt_pb.AnswerInputRequest) -> rt_pb.AnswerInputResponse:
        return await self._unary(self._stub.AnswerInput, request, self._timeout)

    async def pause(self, request: rt_pb.PauseOperationRequest) -> rt_pb.PauseOperationResponse:
        return await self._unary(self._stub.PauseOperation, request, self._timeout)

    async def resume(self, request: rt_pb.ResumeOperationRequest) -> rt_pb.ResumeOperationResponse:
        return await self._unary(self._stub.ResumeOperation, request, self._timeout)

    async def serving(self, deadline_seconds: float) -> bool:
        """Whether a runtime (the one this call lands on) answers its health check SERVING for
        RuntimeService; a runtime shutting down answers NOT_SERVING."""
        request = health_pb2.HealthCheckRequest(service=RUNTIME_SERVICE)
        try:
            reply = await self._health.Check(request, timeout=deadline_seconds)
        except aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def watch(self, operation_id: str, after_seq: int) -> AsyncGenerator[op_pb.Event, None]:
        """The runtime's events after `after_seq`, one by one (the runtime sends them in batches),
        until it ends the stream; UpstreamError when the call fails. Close the iterator (for
        example with contextlib.aclosing) to cancel the call when leaving it early."""
        call = self._stub.WatchOperation(
            rt_pb.WatchOperationRequest(operation_id=operation_id, after_seq=after_seq, batch=True),
            metadata=tracing.outgoing_metadata(self._metadata),
        )
        named = False
        try:
            async for response in call:
                if not named:
                    # Named only by the replica that runs the operation (sent with the first
                    # message, so already here).
                    named = True
                    self.replicas.learn(operation_id, await call.initial_metadata())
                for event in response.events if response.events else (response.event,):
                    yield event
        except aio.AioRpcError as exc:
            raise _stream_error(exc) from exc
        finally:
            call.cancel()


def _stream_error(exc: aio.AioRpcError) -> UpstreamError:
    if exc.code() is grpc.StatusCode.CANCELLED:
        # CANCELLED from the runtime's side: it is shutting down; resume like UNAVAILABLE.
        return UpstreamError(grpc.StatusCode.UNAVAILABLE, exc.details() or "")
    return UpstreamError.from_rpc_error(exc)


class WatchedStart:
    """A StartAndWatchOperation call whose first message, the start's answer, has arrived; the
    rest of the stream is the operation's events from seq 1, read once with `events`."""

    def __init__(
        self,
        call: Any,
        messages: AsyncIterator[rt_pb.StartAndWatchOperationResponse],
        response: rt_pb.StartOperationResponse,
    ) -> None:
        self._call = call
        self._messages = messages
        self.response = response

    async def events(self) -> AsyncGenerator[op_pb.Event, None]:
        """The events after the answer, until the runtime ends the stream; UpstreamError as for
        `RuntimeLink.watch`. Close the iterator to cancel the call when leaving it early."""
        try:
            async for message in self._messages:
                for event in message.events:
                    yield event
        except aio.AioRpcError as exc:
            raise _stream_error(exc) from exc
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        """End the call (harmless once it has ended): nobody will read the events."""
        self._call.cancel()
