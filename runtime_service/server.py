"""The runtime's gRPC server: RuntimeService plus health and reflection, with graceful shutdown."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1._async import HealthServicer

from runtime_service.agents.registry import AgentRegistry
from runtime_service.app import RuntimeApp
from runtime_service.config import RuntimeConfig
from runtime_service.servicer import RuntimeServicer
from runtime_service.trust import ServiceCredential, TrustConfigError
from stopline import tracing
from stopline.authn import AuthInterceptor
from stopline.grpc_status import MalformedRequestGuard
from stopline.metrics import MetricsEndpoint, serve_metrics_at
from stopline.serving import (
    add_health_and_reflection,
    bind,
    receive_limit,
    run_until_signal,
    server_options,
)
from stopline.v1 import runtime_service_pb2, runtime_service_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = runtime_service_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name


@dataclass
class RunningRuntime:
    server: aio.Server
    port: int
    health: HealthServicer
    app: RuntimeApp
    metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING (load balancers drain us); end watches so their clients reconnect
        elsewhere; hand running operations back (they resume from their checkpoints on another
        replica or the next start); then let unary calls in flight finish within the grace."""
        await self.health.enter_graceful_shutdown()
        self.app.hub.close()
        await self.app.runner.shutdown()
        await self.server.stop(self.app.config.shutdown_grace_seconds if grace is None else grace)
        await self.app.close()
        if self.metrics is not None:
            self.metrics.close()


def caller_checks(config: RuntimeConfig) -> list[AuthInterceptor]:
    """The interceptors that keep untrusted callers out; TrustConfigError when nothing would."""
    mutual_tls = config.tls is not None and config.tls.mutual
    if not config.service_tokens and not mutual_tls and not config.allow_any_caller:
        raise TrustConfigError(
            "the runtime would serve any caller: configure a service credential "
            "(--service-token-file or STOPLINE_SERVICE_TOKEN) and/or mutual TLS "
            "(--tls-cert, --tls-key, --tls-client-ca); for local development only, "
            "--insecure-allow-any-caller"
        )
    if not config.service_tokens:
        return []
    return [ServiceCredential(config.service_tokens).interceptor()]


async def start_runtime(
    config: RuntimeConfig, agents: AgentRegistry | None = None
) -> RunningRuntime:
    interceptors = caller_checks(config)
    app = await RuntimeApp.open(config, agents)
    server = aio.server(
        options=server_options(receive_limit(config.max_request_bytes, config.max_input_bytes)),
        # Credentials first: an unauthenticated caller learns nothing, not even about its bytes.
        # The metrics interceptor only when metrics are served (see the gateway's server.py).
        # Tracing (when on) first of all: refused calls have spans too.
        interceptors=[
            *tracing.server_interceptors(),
            *([app.runner.metrics.grpc.interceptor()] if config.metrics_address else []),
            *interceptors,
            MalformedRequestGuard(),
        ],
    )
    runtime_service_pb2_grpc.add_RuntimeServiceServicer_to_server(
        RuntimeServicer(app.operations, config.advertise_address), server
    )
    try:
        port = bind(server, config.address, config.tls)
    except OSError:
        await app.close()
        raise
    health = await add_health_and_reflection(server, [SERVICE_NAME], config.reflection)
    try:
        endpoint = serve_metrics_at(config.metrics_address, app.runner.metrics.registry)
    except OSError:
        await app.close()
        raise
    await server.start()
    return RunningRuntime(server, port, health, app, endpoint)


# Collect the youngest generation after this many net allocations (CPython's default is 700).
GC_YOUNG_THRESHOLD = 100_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a process that keeps thousands of steps alive.

    Every running step keeps its coroutine, its sleep and its pending writes alive for about a
    step's length. With CPython's default thresholds the young collections (every 700
    allocations) promote all of them, they reach the oldest generation by the thousands a
    second, and a full collection (which scans every object of the process, 0.8 s at 10,000
    running operations) ran every 3 s: 40 % of the runtime's time (bench/capacity.py, issue 17).
    Collecting the young generation every GC_YOUNG_THRESHOLD allocations lets most of them die
    young (reference counting frees them) before any collection sees them, and freezing what
    start-up built (modules, the registries, the server) takes it out of every later scan.
    Garbage in reference cycles is still collected, only in larger batches."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


async def serve(config: RuntimeConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_runtime(config)
    tune_gc()
    if config.allow_any_caller and not config.service_tokens:
        log.warning("INSECURE: serving any caller without a service credential (development only)")
    log.info("runtime listening on %s (database %s)", config.address, running.app.storage.dialect)
    if running.metrics is not None:
        log.info("runtime metrics on http://%s/metrics", config.metrics_address)
    await run_until_signal(running.stop)
