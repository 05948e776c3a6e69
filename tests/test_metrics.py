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
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway_service.server import RunningGateway, start_gateway
from runtime_service import stop_causes
from runtime_service.database import Database, create_db_engine
from runtime_service.domain import StopCause
from runtime_service.metrics import (
    CAUSES,
    WRITE_PATHS,
    StorageMetrics,
    StoredOperations,
    UnfinishedCounts,
)
from runtime_service.server import RunningRuntime, start_runtime
from runtime_service.storage import open_storage
from runtime_service.storage.batching import Outcome, WriteQueue
from stopline.errors import Unavailable
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.metrics import MetricsEndpoint
from stopline.transport import split_host_port
from tests.agents import registry
from tests.conftest import eventually, opened_storage, runtime_config
from tests.credentials import PRINCIPAL, TOKEN, gateway_channel
from tests.test_gateway import TICKER_30S, kind, read_until, start_request
from tests.test_gateway import gateway_config as gateway_settings
from tests.test_leases import wait_until_lease_lapses

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
        running = await scrape(runtime.metrics)
        assert value(running, "stopline_runtime_operations_running") == 1
        # The database's count, by status: the one operation RUNNING, nothing left to claim.
        assert value(running, "stopline_runtime_operations", status="RUNNING") == 1
        assert value(running, "stopline_runtime_operations", status="PENDING") == 0
        assert value(running, "stopline_runtime_operations_pending") == 0
        answer = await stub.StopOperation(pb.StopOperationRequest(operation_id=op_id))
        assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
        updates += await read_until(call, lambda u: kind(u) == "event:interrupted")
        async for update in call:  # to the stream's end, so its call is counted
            updates.append(update)
    events_sent = sum(1 for u in updates if u.WhichOneof("update") == "event")

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

    async def none_running() -> bool:  # the status count is at most a second old
        samples = await scrape(runtime.metrics)
        return value(samples, "stopline_runtime_operations", status="RUNNING") == 0

    await eventually(none_running)
    assert value(rt, "stopline_runtime_lease_takeovers_total", outcome="resumed") == 0
    # Every runner write went through one of the write paths; the stop was recorded once.
    writes = sum(
        value(rt, "stopline_runtime_storage_write_seconds_count", path=path) for path in WRITE_PATHS
    )
    # The claim with its first step begun, the stop, and the halt, at least.
    assert writes >= 3
    assert value(rt, "stopline_runtime_storage_unavailable_total") == 0
    # Each event sent on the stream measured for its lag once.
    assert value(gw, "stopline_gateway_stream_lag_seconds_count") == events_sent
    rt_calls = "stopline_runtime_grpc_server_calls_total"
    # The watch the gateway closed after the terminal event is CANCELLED, never UNKNOWN.
    assert not [s for s in rt if s.name == rt_calls and s.labels["code"] == "UNKNOWN"]
    assert value(rt, rt_calls, method=f"{RUNTIME_SERVICE}/InterruptOperation", code="OK") == 1
    assert value(rt, rt_calls, method=f"{RUNTIME_SERVICE}/StartAndWatchOperation", code="OK") == 1

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
    assert split_host_port("[::1]:9464", "metrics address") == ("::1", 9464)
    assert split_host_port("0.0.0.0:9464", "metrics address") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", ":9464", "host:port", "host:65536"):
        with pytest.raises(ValueError, match=f"metrics address '{bad}' is not host:port"):
            split_host_port(bad, "metrics address")


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


def registry_samples(registry: CollectorRegistry) -> list[Sample]:
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    ]


async def test_storage_counts_unfinished_operations_by_status_and_claimable(
    db_url: str,
) -> None:
    storage = await opened_storage(db_url)
    try:
        ids = [(await storage.create("echo", {"n": n}, None)).operation.id for n in range(3)]
        await storage.create("echo", {}, None, hold_seconds=3600)  # held: not claimable
        counts = await storage.count_unfinished()
        assert counts.by_status == {"PENDING": 4} and counts.claimable == 3
        assert await storage.claim_and_start(ids[0], "A", 30) is not None
        await storage.halt(ids[0], 0, True, "A")  # INTERRUPTED now: not counted at all
        assert await storage.claim_and_start(ids[1], "A", 30) is not None
        counts = await storage.count_unfinished()
        assert counts.by_status == {"PENDING": 2, "RUNNING": 1} and counts.claimable == 1
    finally:
        await storage.close()


async def test_stored_operations_are_counted_only_when_scraped_and_at_most_once_per_max_age(
    sqlite_url: str,
) -> None:
    storage = await opened_storage(sqlite_url)
    reads = 0

    async def count() -> UnfinishedCounts:
        nonlocal reads
        reads += 1
        return await storage.count_unfinished()

    try:
        registry = CollectorRegistry(auto_describe=True)
        stored = StoredOperations(max_age=3600)
        registry.register(stored)
        await storage.create("echo", {}, None)
        unbound = await asyncio.to_thread(registry_samples, registry)
        assert value(unbound, "stopline_runtime_operations_pending") == 0  # nothing to read yet
        stored.bind(asyncio.get_running_loop(), count)
        first = await asyncio.to_thread(registry_samples, registry)
        assert value(first, "stopline_runtime_operations", status="PENDING") == 1
        assert value(first, "stopline_runtime_operations", status="RUNNING") == 0
        assert value(first, "stopline_runtime_operations_pending") == 1
        await storage.create("echo", {}, None)
        again = await asyncio.to_thread(registry_samples, registry)
        assert reads == 1  # within max_age: the count read before
        assert value(again, "stopline_runtime_operations_pending") == 1
    finally:
        await storage.close()


async def test_storage_metrics_count_batches_calls_and_an_unreachable_database() -> None:
    meters = StorageMetrics(registry := CollectorRegistry())
    engine = create_db_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere")
    storage = open_storage(Database(engine), "postgresql+psycopg://postgres@127.0.0.1:9/x", meters)
    try:
        with pytest.raises(Unavailable):
            await storage.get("00000000-0000-0000-0000-000000000000")
        with pytest.raises(Unavailable):
            await storage.create("echo", {}, None)  # through the batcher
    finally:
        await storage.close()
    samples = registry_samples(registry)
    assert value(samples, "stopline_runtime_storage_unavailable_total") == 2
    assert value(samples, "stopline_runtime_storage_call_seconds_count", call="get") == 1
    assert value(samples, "stopline_runtime_storage_write_seconds_count", path="batch") == 1


async def test_a_write_queue_reports_each_batch_size_once() -> None:
    batches: list[int] = []

    class Doubling(WriteQueue[Any]):
        async def _write_batch(self, batch: list[Any], urgent: bool) -> list[Outcome]:
            await asyncio.sleep(0)
            return [(True, queued.n * 2) for queued in batch]

    @dataclass(eq=False)
    class Queued:
        n: int
        future: asyncio.Future[Any]

    queue = Doubling("test", 4, observe=lambda size, _seconds: batches.append(size))
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(queue._enqueue(Queued(n, loop.create_future())) for n in range(10))
    )
    assert results == [n * 2 for n in range(10)]
    assert sum(batches) == 10 and max(batches) <= 4


async def test_a_takeover_is_counted_as_resumed(db_url: str) -> None:
    storage = await opened_storage(db_url)
    try:
        op_id = (await storage.create("ticker", TICKER_30S, None)).operation.id
        await storage.claim_and_start(op_id, "dead-runner", 0.2)
        await wait_until_lease_lapses(storage, op_id)
    finally:
        await storage.close()
    runtime = await start_runtime(runtime_config(db_url, metrics_address=ANY_PORT), registry())
    try:
        takeovers = "stopline_runtime_lease_takeovers_total"

        async def taken() -> list[Sample] | None:
            samples = await scrape(runtime.metrics)
            return samples if value(samples, takeovers, outcome="resumed") else None

        samples = await eventually(taken)
        assert value(samples, takeovers, outcome="resumed") == 1
        assert value(samples, takeovers, outcome="halted") == 0
    finally:
        await runtime.stop(grace=0)
