"""A real Prometheus server (issue 16): Debian's `prometheus`, run as a subprocess with a config
of the test's own, scrapes both services while a stop goes through the gateway; its query API
then returns the stop-latency histograms of both, the dashboard's stop-latency query
(histogram_quantile over the buckets) answers with a number, and every dashboard query is valid
PromQL."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

from gateway_service.server import start_gateway
from runtime_service.server import start_runtime
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.agents import registry
from tests.conftest import eventually, runtime_config
from tests.credentials import TOKEN, gateway_channel
from tests.prometheus import PrometheusServer, require_prometheus
from tests.test_gateway import TICKER_30S, kind, read_until, start_request
from tests.test_gateway import gateway_config as gateway_settings
from tests.test_metrics_docs import REPO, dashboard_exprs

ANY_PORT = "127.0.0.1:0"


async def test_prometheus_scrapes_both_services_and_returns_the_stop_latency_histogram(
    sqlite_url: str, tmp_path: Path
) -> None:
    binary = require_prometheus()
    runtime = await start_runtime(runtime_config(sqlite_url, metrics_address=ANY_PORT), registry())
    gateway = await start_gateway(gateway_settings(runtime.address, metrics_address=ANY_PORT))
    prometheus: PrometheusServer | None = None
    try:
        assert runtime.metrics is not None and gateway.metrics is not None
        jobs = {
            "stopline-runtime": [f"127.0.0.1:{runtime.metrics.port}"],
            "stopline-gateway": [f"127.0.0.1:{gateway.metrics.port}"],
        }
        prometheus = await asyncio.to_thread(
            PrometheusServer, tmp_path / "prometheus", jobs, "500ms", binary
        )
        server = prometheus

        async def query(expr: str) -> list[dict[str, Any]]:
            return await asyncio.to_thread(server.query, expr)

        async def both_up() -> bool:
            return await asyncio.to_thread(server.targets_up) == 2

        await eventually(both_up, timeout=60, interval=0.2)

        async with gateway_channel(gateway.address, TOKEN) as channel:
            stub: Any = pb_grpc.GatewayServiceStub(channel)
            call = stub.StartAndStream(start_request("ticker", TICKER_30S))
            updates = await read_until(call, lambda u: kind(u) == "event:step_started")
            op_id = updates[0].accepted.operation_id
            answer = await stub.StopOperation(pb.StopOperationRequest(operation_id=op_id))
            assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
            await read_until(call, lambda u: kind(u) == "event:interrupted")

        def counted(expr: str) -> Any:
            async def probe() -> list[dict[str, Any]] | None:
                samples = await query(expr)
                return samples if samples and float(samples[0]["value"][1]) >= 1 else None

            return probe

        for expr, job in (
            ("stopline_gateway_stop_seen_by_client_seconds_count", "stopline-gateway"),
            ('sum(stopline_gateway_stop_ack_seconds_bucket{le="+Inf"})', None),
            ("stopline_runtime_stop_interrupted_seconds_count", "stopline-runtime"),
        ):
            [sample] = await eventually(counted(expr), timeout=60, interval=0.2)
            assert float(sample["value"][1]) == 1
            if job is not None:
                assert sample["metric"]["job"] == job

        # The dashboard's stop-latency panel: a quantile over the buckets is a number.
        [p99] = await query(
            "histogram_quantile(0.99, sum by (le) "
            "(stopline_gateway_stop_seen_by_client_seconds_bucket))"
        )
        assert math.isfinite(float(p99["value"][1]))
        # Every query of the committed dashboard is valid PromQL that Prometheus evaluates.
        for expr in dashboard_exprs():
            await query(expr.replace("$__rate_interval", "5s"))
    finally:
        if prometheus is not None:
            await asyncio.to_thread(prometheus.close)
        await gateway.stop(grace=0)
        await runtime.stop(grace=0)


def test_the_example_prometheus_config_is_valid() -> None:
    binary = require_prometheus()
    promtool = shutil.which("promtool") or str(Path(binary).with_name("promtool"))
    checked = subprocess.run(
        [promtool, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
