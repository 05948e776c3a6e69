"""What both services share for Prometheus metrics: the buckets, the HTTP endpoint, and the gRPC
server interceptor counting calls by method and status code.

Every app instance owns a CollectorRegistry of its own (never prometheus-client's global one), so
several servers in one process (the tests, `stopline dev`) keep separate counts. Label values are
drawn from closed sets (method names known from the protos, status codes, enum values): never an
operation id or a principal, which would make one time series per operation or caller.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

import click
import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from stopline.handlers import Handler, WrappedHandlers, with_behaviour
from stopline.transport import split_host_port

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Seconds, for the stop path and gRPC calls: stops are answered in milliseconds, so most of the
resolution is below 100 ms; the tail reaches a slow agent's grace and a long stream."""

OTHER_METHOD = "other"
"""The method label of a call to a method the server does not serve (any name a client sends)."""


@dataclass
class MetricsEndpoint:
    """The HTTP server answering GET /metrics (any path) in Prometheus' text format, on a thread
    of prometheus-client's own, so a scrape never runs on the event loop."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(address: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Listen on `address` (port 0: any free one); OSError when it cannot."""
    host, port = split_host_port(address, "metrics address")
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)


def serve_metrics_at(address: str | None, registry: CollectorRegistry) -> MetricsEndpoint | None:
    """serve_metrics when an address is configured (metrics are off by default)."""
    return None if address is None else serve_metrics(address, registry)


metrics_address_option = click.option(
    "--metrics-address",
    envvar="STOPLINE_METRICS_ADDRESS",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics over HTTP on this address (off when unset).",
)


def method_names(services: Iterable[Any]) -> frozenset[str]:
    """The full gRPC method paths ("/package.Service/Method") of the given service descriptors."""
    return frozenset(
        f"/{service.full_name}/{method.name}" for service in services for method in service.methods
    )


class GrpcMetrics:
    """gRPC server calls by method and status code, and their latency (for a stream: its whole
    life). Built once per server on that server's registry."""

    def __init__(self, registry: CollectorRegistry, prefix: str, methods: frozenset[str]) -> None:
        self.methods = methods
        self.calls = Counter(
            f"{prefix}_grpc_server_calls",
            "gRPC calls served, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            f"{prefix}_grpc_server_call_seconds",
            "Time from a gRPC call's arrival at its handler to its end, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def interceptor(self) -> GrpcMetricsInterceptor:
        return GrpcMetricsInterceptor(self)


def _code(context: aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpcio stores the raw integer in some versions
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # GeneratorExit: a stream closed by grpc at a yield, as when its client went away.
        return grpc.StatusCode.CANCELLED.name
    if error is not None:
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


class GrpcMetricsInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Put first among a server's interceptors, so refusals by the others (UNAUTHENTICATED,
    malformed requests) are counted too. Wrapped handlers are cached per method: the per-call
    cost is one wrapper call, a monotonic clock read and two metric updates."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self._metrics = metrics
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method not in self._metrics.methods:
            method = OTHER_METHOD
        cached = self._wrapped.get(method, handler)
        if cached is not None:
            return cached
        measured = with_behaviour(handler, partial(self._measure, method))
        if method == OTHER_METHOD:
            return measured  # many methods share the label: each call is wrapped anew
        return self._wrapped.keep(method, handler, measured)

    def _measure(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        calls = self._metrics.calls
        seconds = self._metrics.seconds.labels(method)

        def record(context: Any, started: float, error: BaseException | None) -> None:
            seconds.observe(time.monotonic() - started)
            calls.labels(method, _code(context, error)).inc()

        if inspect.isasyncgenfunction(behaviour):

            async def measured_stream(request: Any, context: Any) -> AsyncGenerator[Any, None]:
                started = time.monotonic()
                error: BaseException | None = None
                try:
                    async for item in behaviour(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    record(context, started, error)

            return measured_stream

        async def measured(request: Any, context: Any) -> Any:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(context, started, error)

        return measured
