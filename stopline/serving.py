"""What both servers share: gRPC options, health and reflection, and running until a signal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from stopline.transport import ServerTLS

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def receive_limit(max_request_bytes: int, max_input_bytes: int) -> int:
    """gRPC's receive limit: the configured request limit, raised to twice the input limit if that
    is larger, so that an input under its own limit (answered INVALID_ARGUMENT naming it) is never
    cut off first by the transport's cruder RESOURCE_EXHAUSTED."""
    return max(max_request_bytes, 2 * max_input_bytes)


def server_options(max_receive_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> list[tuple[str, Any]]:
    return [
        # Larger requests are refused by gRPC before any Stopline code runs: RESOURCE_EXHAUSTED,
        # "Received message larger than max (<size> vs. <limit>)".
        ("grpc.max_receive_message_length", max_receive_bytes),
        # Ping clients that have been quiet for a minute: a client that vanished without closing
        # its connection (host crash, cable pulled) frees its streams in about 80 s instead of at
        # the next TCP timeout, which can be hours.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # gRPC turns SO_REUSEPORT on by default: a second server on a taken port would then start
        # "successfully" and split the traffic between two processes.
        ("grpc.so_reuseport", 0),
        # Accept the keepalive pings our clients send (the gateway pings its runtimes every
        # second, gateway_service/runtime_link.py) instead of answering them with GOAWAY
        # "too_many_pings"; 0 strikes means none is ever counted against a client.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
        ("grpc.http2.max_ping_strikes", 0),
    ]


async def add_health_and_reflection(
    server: aio.Server, services: Iterable[str], with_reflection: bool = True
) -> HealthServicer:
    """Register grpc.health.v1 (SERVING for "" and each service) and, unless switched off (it
    tells anyone who can connect what the API looks like), server reflection."""
    names = list(services)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if with_reflection:
        reflection.enable_server_reflection(
            (*names, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return health


def bind(server: aio.Server, address: str, tls: ServerTLS | None = None) -> int:
    """Listen on `address`, over TLS when `tls` is given (plaintext otherwise)."""
    try:
        credentials = tls.credentials() if tls is not None else None
    except ValueError as exc:
        raise OSError(str(exc)) from exc
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc


async def run_until_signal(stop: Callable[[], Awaitable[None]]) -> None:
    """Wait for SIGTERM or SIGINT, then run `stop` (graceful shutdown)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await stop()
