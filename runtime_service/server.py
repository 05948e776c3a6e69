"""The runtime's gRPC server: RuntimeService plus health and reflection, with graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from runtime_service.agents.registry import AgentRegistry
from runtime_service.app import RuntimeApp
from runtime_service.config import RuntimeConfig
from runtime_service.servicer import RuntimeServicer
from stopline.v1 import runtime_service_pb2, runtime_service_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = runtime_service_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name


@dataclass
class RunningRuntime:
    server: aio.Server
    port: int
    health: HealthServicer
    app: RuntimeApp

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING first (load balancers drain us), then stop within the grace."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.app.config.shutdown_grace_seconds if grace is None else grace)
        await self.app.close()


async def start_runtime(
    config: RuntimeConfig, agents: AgentRegistry | None = None
) -> RunningRuntime:
    app = await RuntimeApp.open(config, agents)
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", max(4 * 1024 * 1024, 2 * config.max_input_bytes)),
            # gRPC turns SO_REUSEPORT on by default: a second runtime on a taken port would then
            # start "successfully" and split the traffic between two databases.
            ("grpc.so_reuseport", 0),
        ]
    )
    runtime_service_pb2_grpc.add_RuntimeServiceServicer_to_server(
        RuntimeServicer(app.operations), server
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as exc:
        await app.close()
        raise OSError(f"cannot listen on {config.address}: {exc}") from exc
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningRuntime(server, port, health_servicer, app)


async def serve(config: RuntimeConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_runtime(config)
    log.info("runtime listening on %s (database %s)", config.address, running.app.db.backend)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("shutting down (grace %.1fs)", config.shutdown_grace_seconds)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.stop()


__all__ = ["RunningRuntime", "grpc", "serve", "start_runtime"]
