"""The gateway's connection to the runtime: one channel with keepalive, errors as UpstreamError."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio
from tenacity import wait_exponential_jitter

from stopline.grpc_status import UpstreamError
from stopline.transport import ClientTLS, bearer_metadata, open_channel
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc

T = TypeVar("T")

# Keepalive finds a dead runtime connection in seconds instead of at the next TCP timeout, and a
# short reconnect backoff picks a restarted runtime up quickly.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

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
    ) -> None:
        self.address = address
        # The service credential goes with every call; the runtime refuses calls without it.
        # Passed per call, not by a client interceptor: gRPC's aio interceptors cost about
        # 150 µs per unary call and 10 µs per streamed message (a stop's acknowledgment pays it).
        self._metadata = bearer_metadata(token) if token else None
        self._channel = open_channel(address, None, tls, CHANNEL_OPTIONS)
        self._stub = rt_grpc.RuntimeServiceStub(self._channel)
        self._timeout = rpc_timeout

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, deadline: float) -> T:
        try:
            return await method(request, timeout=deadline, metadata=self._metadata)
        except aio.AioRpcError as exc:
            raise UpstreamError.from_rpc_error(exc) from exc

    async def start(self, request: rt_pb.StartOperationRequest) -> rt_pb.StartOperationResponse:
        return await self._unary(self._stub.StartOperation, request, self._timeout)

    async def release(self, operation_id: str) -> None:
        request = rt_pb.ReleaseOperationRequest(operation_id=operation_id)
        await self._unary(self._stub.ReleaseOperation, request, self._timeout)

    async def interrupt(
        self, request: rt_pb.InterruptOperationRequest, deadline_seconds: float
    ) -> rt_pb.InterruptOperationResponse:
        return await self._unary(self._stub.InterruptOperation, request, deadline_seconds)

    async def get(self, operation_id: str) -> rt_pb.GetOperationResponse:
        request = rt_pb.GetOperationRequest(operation_id=operation_id)
        return await self._unary(self._stub.GetOperation, request, self._timeout)

    async def list(self, request: rt_pb.ListOperationsRequest) -> rt_pb.ListOperationsResponse:
        return await self._unary(self._stub.ListOperations, request, self._timeout)

    def watch(self, operation_id: str, after_seq: int) -> Any:
        """The raw streaming call; iterate it, and expect aio.AioRpcError on failure."""
        return self._stub.WatchOperation(
            rt_pb.WatchOperationRequest(operation_id=operation_id, after_seq=after_seq, batch=True),
            metadata=self._metadata,
        )
