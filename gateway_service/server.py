"""The gateway's gRPC server: GatewayService plus health and reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1._async import HealthServicer

from gateway_service.auth import Authenticator
from gateway_service.config import GatewayConfig
from gateway_service.core import Gateway
from gateway_service.readiness import Readiness
from gateway_service.runtime_link import RuntimeLink
from gateway_service.servicer import GatewayServicer
from stopline import tracing
from stopline.gateway.v1 import gateway_service_pb2, gateway_service_pb2_grpc
from stopline.grpc_status import MalformedRequestGuard
from stopline.metrics import MetricsEndpoint, serve_metrics_at
from stopline.serving import (
    add_health_and_reflection,
    bind,
    receive_limit,
    run_until_signal,
    server_options,
)

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@dataclass
class RunningGateway:
    server: aio.Server
    port: int
    health: HealthServicer
    gateway: Gateway
    readiness: asyncio.Task[None]
    metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        self.readiness.cancel()
        await asyncio.wait([self.readiness])
        config_grace = self.gateway.config.shutdown_grace_seconds
        await self.server.stop(config_grace if grace is None else grace)
        await self.gateway.close()
        if self.metrics is not None:
            self.metrics.close()


async def start_gateway(config: GatewayConfig) -> RunningGateway:
    """Raises AuthConfigError when no credentials are configured: a gateway that let anybody in
    would hand every operation to every caller."""
    authenticator = Authenticator.from_settings(config.auth)
    link = RuntimeLink(
        config.runtime_address,
        config.rpc_timeout_seconds,
        token=config.service_token,
        tls=config.runtime_tls,
        load_balancing=config.runtime_load_balancing,
        route_capacity=config.owner_cache_size,
    )
    gateway = Gateway(config, link)
    authenticator.on_refused = gateway.metrics.count_auth_failure
    server = aio.server(
        options=server_options(receive_limit(config.max_request_bytes, config.max_input_bytes)),
        # Credentials first: an unauthenticated caller learns nothing, not even about its bytes.
        # The metrics interceptor only when metrics are served: a wrapper per call costs
        # tens of microseconds that nobody would read. First: it counts the others' refusals too.
        # Tracing (when on) first of all: refused calls have spans too.
        interceptors=[
            *tracing.server_interceptors(),
            *([gateway.metrics.grpc.interceptor()] if config.metrics_address else []),
            authenticator.interceptor(),
            MalformedRequestGuard(),
        ],
    )
    gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(gateway), server)
    try:
        port = bind(server, config.address, config.tls)
    except OSError:
        await gateway.close()
        raise
    health = await add_health_and_reflection(server, [SERVICE_NAME], config.reflection)
    readiness = Readiness(
        link,
        health,
        SERVICE_NAME,
        config.readiness_interval_seconds,
        config.readiness_timeout_seconds,
    )
    await readiness.probe()  # the first answer before anyone can ask
    try:
        endpoint = serve_metrics_at(config.metrics_address, gateway.metrics.registry)
    except OSError:
        await gateway.close()
        raise
    await server.start()
    task = asyncio.create_task(readiness.run(), name="readiness")
    return RunningGateway(server, port, health, gateway, task, endpoint)


async def serve(config: GatewayConfig) -> None:
    running = await start_gateway(config)
    log.info(
        "gateway listening on %s (runtime %s, %s)",
        config.address,
        config.runtime_address,
        config.runtime_load_balancing.value,
    )
    if running.metrics is not None:
        log.info("gateway metrics on http://%s/metrics", config.metrics_address)
    await run_until_signal(running.stop)
