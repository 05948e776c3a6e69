"""The gateway's readiness: its service reports SERVING only while a runtime answers.

A gateway without a runtime can authenticate callers and nothing else, so a load balancer or an
orchestrator probing `stopline.gateway.v1.GatewayService` should send clients elsewhere. The empty
service name stays SERVING while the process runs (liveness: restarting the gateway would not
bring the runtime back).
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from gateway_service.runtime_link import RuntimeLink

log = logging.getLogger(__name__)

# Health checks per probe before the gateway reports NOT_SERVING: under round_robin each goes to
# the next replica, so one replica that is down, draining or frozen does not make it unready.
TRIES = 3


class Readiness:
    def __init__(
        self,
        link: RuntimeLink,
        health: HealthServicer,
        service: str,
        interval_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self._link = link
        self._health = health
        self._service = service
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        self.ready: bool | None = None

    async def probe(self) -> bool:
        """Ask the runtime(s) once and report the answer in the gateway's health."""
        ready = False
        for _ in range(TRIES):
            if await self._link.serving(self._timeout):
                ready = True
                break
        if ready != self.ready:
            if ready:
                log.info("a runtime answers: %s is SERVING", self._service)
            else:
                log.warning("no runtime answers: %s is NOT_SERVING", self._service)
        self.ready = ready
        serving = health_pb2.HealthCheckResponse
        status = serving.SERVING if ready else serving.NOT_SERVING
        await self._health.set(self._service, status)
        return ready

    async def run(self) -> None:
        """Probe every interval until cancelled (a timer, not a wait for anything)."""
        while True:
            await asyncio.sleep(self._interval)
            await self.probe()
