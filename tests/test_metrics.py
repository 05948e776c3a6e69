"""Prometheus metrics (issue 16, item 1): after one stop through the gateway, both endpoints are
scraped over HTTP and parsed with prometheus-client's own parser. Each phase of the stop path is
counted exactly once with the right labels, gRPC calls by method and code, and no label value
is an operation id or a principal."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from gateway_service.server import RunningGateway, start_gateway
from runtime_service import stop_causes
from runtime_service.domain import StopCause
from runtime_service.metrics import CAUSES
from runtime_service.server import RunningRuntime, start_runtime
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.metrics import MetricsEndpoint, parse_address
from tests.agents import registry
from tests.conftest import eventually, runtime_config
from tests.credentials import PRINCIPAL, TOKEN, gateway_channel
from tests.test_gateway import TICKER_30S, kind, read_until, start_request
from tests.test_gateway import gateway_config as gateway_settings

ANY_PORT = "127.0.0.1:0"
GATEWAY_SERVICE = "/stopline.gateway.v1.GatewayService"
RUNTIME_SERVICE = "/stopline.v1.RuntimeService"


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


async def scrape(endpoint: MetricsEndpoint | None) -> list[Sample]:
    """GET the endpoint over HTTP (off the event loop) and parse the Prometheus text."""
    assert endpoint is not None

    def get() -> str:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body: bytes = answer.read()
            return body.decode()

    text = await asyncio.to_thread(get)
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sample's value (0 when absent: a labelled series appears at its first update)."""
    for sample in samples:
        if sample.name == name and sample.labels == labels:
            return sample.value
    return 0.0


@pytest.fixture
async def servers(db_url: str) -> AsyncIterator[tuple[RunningRuntime, RunningGateway]]:
    runtime = await start_runtime(runtime_config(db_url, metrics_address=ANY_PORT), registry())
    try:
        gateway = await start_gateway(gateway_settings(runtime.address, metrics_address=ANY_PORT))
        try:
            yield runtime, gateway
        finally:
            await gateway.stop(grace=0)
    finally:
        await runtime.stop(grace=0)


async def test_one_stop_is_counted_once_in_each_phase_on_both_services(
    servers: tuple[RunningRuntime, RunningGateway],
) -> None:
    runtime, gateway = servers
    async with gateway_channel(gateway.address, TOKEN) as channel:
        stub: Any = pb_grpc.GatewayServiceStub(channel)
        call = stub.StartAndStream(start_request("ticker", TICKER_30S))
        updates = await read_until(call, lambda u: kind(u) == "event:step_started")
        op_id = updates[0].accepted.operation_id
        streaming = await scrape(gateway.metrics)
        assert value(streaming, "stopline_gateway_open_streams") == 1
        assert value(await scrape(runtime.metrics), "stopline_runtime_operations_running") == 1
        answer = await stub.StopOperation(pb.StopOperationRequest(operation_id=op_id))
        assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
        await read_until(call, lambda u: kind(u) == "event:interrupted")
        async for _ in call:  # to the stream's end, so its call is counted
            pass

    async def runtime_done() -> list[Sample] | None:
        samples = await scrape(runtime.metrics)
        interrupted = "stopline_runtime_stop_interrupted_seconds_count"
        return samples if value(samples, interrupted) else None

    async def gateway_done() -> list[Sample] | None:
        samples = await scrape(gateway.metrics)
        calls = "stopline_gateway_grpc_server_calls_total"
        stream = {"method": f"{GATEWAY_SERVICE}/StartAndStream", "code": "OK"}
        return samples if value(samples, calls, **stream) else None

    rt = await eventually(runtime_done)
    gw = await eventually(gateway_done)

    # The gateway: the StopOperation call answered once, its delivery in one call, no retry.
    assert value(gw, "stopline_gateway_stop_ack_seconds_count", delivered="true") == 1
    assert value(gw, "stopline_gateway_stop_ack_seconds_count", delivered="false") == 0
    assert value(gw, "stopline_gateway_stop_delivery_seconds_count", outcome="delivered") == 1
    assert value(gw, "stopline_gateway_stop_delivery_calls_total") == 1
    assert value(gw, "stopline_gateway_stop_delivery_retries_total") == 0
    assert value(gw, "stopline_gateway_stop_deliveries_pending") == 0
    # The whole stop as the client saw it: the stop call to the interrupted event on its stream.
    assert value(gw, "stopline_gateway_stop_seen_by_client_seconds_count") == 1
    assert value(gw, "stopline_gateway_open_streams") == 0
    gw_calls = "stopline_gateway_grpc_server_calls_total"
    assert value(gw, gw_calls, method=f"{GATEWAY_SERVICE}/StopOperation", code="OK") == 1
    assert value(gw, gw_calls, method=f"{GATEWAY_SERVICE}/StartAndStream", code="OK") == 1
    stop_latency = "stopline_gateway_grpc_server_call_seconds_count"
    assert value(gw, stop_latency, method=f"{GATEWAY_SERVICE}/StopOperation") == 1

    # The runtime: the stop learned once, the step cut once, the interrupted event once.
    assert value(rt, "stopline_runtime_stop_step_cancelled_seconds_count") == 1
    assert value(rt, "stopline_runtime_stop_interrupted_seconds_count") == 1
    finished = "stopline_runtime_operations_finished_total"
    labels = {"agent": "ticker", "status": "interrupted", "cause": "user"}
    assert value(rt, finished, **labels) == 1
    assert value(rt, "stopline_runtime_operations_started_total", agent="ticker") == 1
    assert value(rt, "stopline_runtime_events_written_total", kind="interrupted") == 1
    assert value(rt, "stopline_runtime_step_seconds_count", agent="ticker") == 1
    assert value(rt, "stopline_runtime_operations_running") == 0
    rt_calls = "stopline_runtime_grpc_server_calls_total"
    assert value(rt, rt_calls, method=f"{RUNTIME_SERVICE}/InterruptOperation", code="OK") == 1
    assert value(rt, rt_calls, method=f"{RUNTIME_SERVICE}/StartOperation", code="OK") == 1

    # Bounded label sets: never an operation id or a principal.
    for sample in [*rt, *gw]:
        for label in sample.labels.values():
            assert op_id not in label and label != PRINCIPAL, sample


async def test_refused_and_unknown_calls_are_counted_with_bounded_labels(
    servers: tuple[RunningRuntime, RunningGateway],
) -> None:
    _, gateway = servers
    async with gateway_channel(gateway.address, "stl_00000000_wrong") as channel:
        stub: Any = pb_grpc.GatewayServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.GetOperation(pb.GetOperationRequest(operation_id="x"))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        made_up = channel.unary_unary(
            "/stopline.gateway.v1.GatewayService/NoSuchMethod", None, None
        )
        with pytest.raises(aio.AioRpcError):
            await made_up(b"")
    samples = await scrape(gateway.metrics)
    calls = "stopline_gateway_grpc_server_calls_total"
    method = f"{GATEWAY_SERVICE}/GetOperation"
    assert value(samples, calls, method=method, code="UNAUTHENTICATED") == 1
    failures = "stopline_gateway_auth_failures_total"
    assert value(samples, failures, kind="api_key") == 1
    async with aio.insecure_channel(gateway.address) as bare:
        with pytest.raises(aio.AioRpcError):
            await pb_grpc.GatewayServiceStub(bare).GetOperation(pb.GetOperationRequest())
    assert value(await scrape(gateway.metrics), failures, kind="no_credentials") == 1
    names = {s.labels.get("method") for s in samples if s.name == calls}
    assert not any(name and "NoSuchMethod" in name for name in names)


async def test_metrics_are_off_unless_an_address_is_given(sqlite_url: str) -> None:
    runtime = await start_runtime(runtime_config(sqlite_url), registry())
    try:
        assert runtime.metrics is None
    finally:
        await runtime.stop(grace=0)


def test_a_metrics_address_must_be_host_and_port() -> None:
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", ":9464", "host:port"):
        with pytest.raises(ValueError, match="not host:port"):
            parse_address(bad)


async def test_a_cancel_policy_stop_is_counted_with_the_client_gone_cause(
    servers: tuple[RunningRuntime, RunningGateway],
) -> None:
    runtime, gateway = servers
    async with gateway_channel(gateway.address, TOKEN) as channel:
        stub: Any = pb_grpc.GatewayServiceStub(channel)
        call = stub.StartAndStream(start_request("ticker", TICKER_30S))
        await read_until(call, lambda u: kind(u) == "event:step_started")
        call.cancel()  # the client leaves; the STOP policy stops its operation

    finished = "stopline_runtime_operations_finished_total"
    labels = {"agent": "ticker", "status": "interrupted", "cause": "client_gone"}

    async def counted() -> list[Sample] | None:
        samples = await scrape(runtime.metrics)
        return samples if value(samples, finished, **labels) else None

    samples = await eventually(counted)
    assert value(samples, finished, **labels) == 1
    causes = {s.labels["cause"] for s in samples if s.name == finished}
    assert causes == {"client_gone"}
    gw = await scrape(gateway.metrics)
    # Nobody asked with StopOperation: the client's view of a stop is not measured.
    assert value(gw, "stopline_gateway_stop_seen_by_client_seconds_count") == 0
    assert value(gw, "stopline_gateway_stop_delivery_seconds_count", outcome="delivered") == 1


def test_every_stop_cause_is_a_declared_cause_label() -> None:
    made = {stop_causes.label(cause) for cause in StopCause}
    made |= {
        stop_causes.label(stop.cause)
        for stop in (
            stop_causes.deadline_exceeded(1.0),
            stop_causes.step_budget_exhausted(3),
            stop_causes.bulk_stop(),
        )
    }
    assert {"user", "client_gone", "grace_expired", "deadline_exceeded", "bulk"} <= made
    assert stop_causes.label(None) == "unknown"
    assert made <= CAUSES
