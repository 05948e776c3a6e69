"""What both servers share: gRPC options, health and reflection, and running until a signal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as _LibraryHealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from stopline.limits import DEFAULT_MAX_REQUEST_BYTES
from stopline.transport import ServerTLS

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


class HealthServicer(_LibraryHealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer plus `List`, which its protocol lists but the library
    leaves UNIMPLEMENTED: a snapshot of every registered service's status."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


def _reflection_v1_file() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default descriptor pool, so reflection can
    describe its own v1 service. grpcio-reflection (1.85) ships only v1alpha; v1 is the same
    file under another package name (identical messages and field numbers), so it is derived
    from v1alpha's descriptor rather than vendored."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1_SERVICE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = "grpc/reflection/v1/reflection.proto"
    file.package = "grpc.reflection.v1"
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.", 1)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    pool.Add(file)


def _add_reflection(server: aio.Server, names: list[str]) -> None:
    """grpc.reflection.v1 and v1alpha, one servicer behind both: current clients (grpcurl 1.8.8+,
    buf curl) ask for v1 first; older ones only know v1alpha. The messages are wire-identical,
    so v1 requests are read with v1alpha's message classes."""
    _reflection_v1_file()
    listed = (*names, HEALTH_SERVICE, REFLECTION_V1_SERVICE, reflection.SERVICE_NAME)
    servicer = ReflectionServicer(listed)
    for service in (REFLECTION_V1_SERVICE, reflection.SERVICE_NAME):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )


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
        _add_reflection(server, names)
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
