"""A gateway sends an operation's release and stops straight to the runtime replica that runs it,
when that replica names itself (`--advertise-address`); otherwise, and whenever that replica's
channel is not connected, through its load-balanced channel as before (gateway_service/replicas.py).

In-process servers for what one replica shows; real processes on one PostgreSQL database for
what two show. No sleeps as synchronisation: stream reads and polls with deadlines.
"""

from __future__ import annotations

import asyncio
import functools
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from gateway_service.replicas import MAX_REPLICAS, Replicas
from gateway_service.runtime_link import LoadBalancing
from gateway_service.server import RunningGateway, start_gateway
from runtime_service.cli import runtime as runtime_cli
from runtime_service.config import RuntimeConfig
from runtime_service.server import start_runtime
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.transport import REPLICA_METADATA
from tests.agents import registry
from tests.conftest import eventually, runtime_config
from tests.credentials import gateway_channel
from tests.ports import free_port
from tests.processes import RuntimeProcess
from tests.test_gateway import (
    TICKER_30S,
    gateway_config,
    is_chunk,
    is_terminal,
    read_until,
    start_request,
)
from tests.test_metrics import registry_samples, value
from tests.test_replicas import REPLICA_ARGS, owner_index, step_rows

STOPS = "stopline_runtime_stops_recorded_total"


def serve_config(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]) -> Any:
    """`stopline runtime serve` with these flags, stopped before it serves: the command's result
    and the configuration it would have served with (None if refused)."""
    configs: list[RuntimeConfig] = []

    async def record(config: RuntimeConfig) -> None:
        configs.append(config)

    monkeypatch.setattr("runtime_service.server.serve", record)
    allow = ["--insecure-allow-any-caller"]
    result = CliRunner().invoke(runtime_cli, ["serve", *allow, *args], env=env)
    return result, configs[0] if configs else None


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, None),
        (["--advertise-address", "10.0.0.5:50051"], {}, "10.0.0.5:50051"),
        (
            [],
            {"STOPLINE_ADVERTISE_ADDRESS": "runtime-2.internal:50051"},
            "runtime-2.internal:50051",
        ),
    ],
)
def test_a_replica_is_named_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: str | None
) -> None:
    result, config = serve_config(monkeypatch, args, env)
    assert result.exit_code == 0, result.output
    assert config.advertise_address == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("0.0.0.0:50051", "names every interface"),
        ("[::]:50051", "names every interface"),
        ("runtime-2", "is not host:port"),
        ("runtime-2:99999", "is not host:port"),
        ("runtime-2:0", "any port"),
        (":50051", "is not host:port"),
    ],
)
def test_an_advertised_address_a_gateway_cannot_dial_is_refused(
    monkeypatch: pytest.MonkeyPatch, address: str, message: str
) -> None:
    result, config = serve_config(monkeypatch, ["--advertise-address", address], {})
    assert result.exit_code == 2 and config is None
    assert "--advertise-address" in result.output and message in result.output


async def started_and_stopped(client: Any) -> tuple[str, Any]:
    """Start a 30-s-step ticker through the gateway, stop it mid-step once it has sent a chunk:
    its id and terminal event."""
    call = client.StartAndStream(
        start_request("ticker", {**TICKER_30S, "chunk_interval_seconds": 0.1})
    )
    first = await read_until(call, is_chunk)
    op_id = first[0].accepted.operation_id
    answer = await client.StopOperation(pb.StopOperationRequest(operation_id=op_id))
    assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
    rest = await read_until(call, is_terminal)
    return op_id, rest[-1].event


async def routed_stub_ready(gateway: RunningGateway, op_id: str) -> bool:
    return gateway.gateway.link.replicas.stub(op_id) is not None


@pytest.mark.parametrize("advertised", [True, False])
async def test_a_replica_that_names_itself_is_remembered_for_its_operations(
    sqlite_url: str, advertised: bool
) -> None:
    address = f"127.0.0.1:{free_port()}"
    runtime = await start_runtime(
        runtime_config(
            sqlite_url, address=address, advertise_address=address if advertised else None
        ),
        registry(),
    )
    gateway = await start_gateway(gateway_config(runtime.address))
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            op_id, terminal = await started_and_stopped(client)
        assert terminal.WhichOneof("kind") == "interrupted" and terminal.interrupted.mid_step
        named = gateway.gateway.link.replicas.replica(op_id)
        assert named == (address if advertised else None)
        samples = registry_samples(runtime.app.runner.metrics.registry)
        # One replica runs everything: its stops reach its own runner however they are sent.
        assert value(samples, STOPS, runs_here="true") == 1
        assert value(samples, STOPS, runs_here="false") == 0
    finally:
        await gateway.stop(grace=0)
        await runtime.stop(grace=0)


async def test_a_replica_named_at_an_address_nobody_answers_costs_only_the_routing(
    sqlite_url: str,
) -> None:
    """A wrong --advertise-address: the gateway's channel to it never connects, so the release
    and the stop go through the load-balanced channel at once (no hedge waited for)."""
    nowhere = f"127.0.0.1:{free_port()}"  # nobody listens here
    runtime = await start_runtime(runtime_config(sqlite_url, advertise_address=nowhere), registry())
    gateway = await start_gateway(gateway_config(runtime.address))
    deliveries: list[Any] = []
    deliver = gateway.gateway.deliverer.deliver

    def recording(*args: Any, **kwargs: Any) -> Any:
        deliveries.append(deliver(*args, **kwargs))
        return deliveries[-1]

    gateway.gateway.deliverer.deliver = recording  # type: ignore[method-assign]
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            op_id, terminal = await started_and_stopped(client)
        assert terminal.WhichOneof("kind") == "interrupted"
        assert gateway.gateway.link.replicas.replica(op_id) == nowhere
        assert not await routed_stub_ready(gateway, op_id)
        (delivery,) = deliveries
        assert (delivery.attempts, delivery.calls) == (1, 1)
    finally:
        await gateway.stop(grace=0)
        await runtime.stop(grace=0)


def scrape_stops(metrics_address: str) -> dict[str, float]:
    """A replica's stops_recorded counters, by runs_here."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        sample.labels["runs_here"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == STOPS
    }


@pytest.mark.postgres
async def test_two_replicas_behind_one_gateway_run_and_stop_each_operation_where_it_started(
    postgres_url: str, tmp_path: Path
) -> None:
    """Through a round_robin gateway, an operation's start, release and stop would land on
    either replica; with both named, each operation runs on the replica its start landed on
    (which streams its events) and each stop is recorded by that replica, so no stop needs the
    notification between replicas."""
    replicas: list[RuntimeProcess] = []
    metrics: list[str] = []
    gateway: RunningGateway | None = None
    try:
        for _ in range(2):
            port, metrics_port = free_port(), free_port()
            metrics.append(f"127.0.0.1:{metrics_port}")
            replicas.append(
                RuntimeProcess(
                    postgres_url,
                    tmp_path,
                    port=port,
                    extra_args=(
                        *REPLICA_ARGS,
                        "--advertise-address",
                        f"127.0.0.1:{port}",
                        "--metrics-address",
                        metrics[-1],
                    ),
                )
            )
        target = "ipv4:" + ",".join(r.address for r in replicas)
        gateway = await start_gateway(
            gateway_config(target, runtime_load_balancing=LoadBalancing.ROUND_ROBIN)
        )
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            # Until the gateway has a connected channel to both replicas, a release may still
            # go through the load balancer: warm both up first.
            warm = await asyncio.gather(*(started_and_stopped(client) for _ in range(4)))
            named = {gateway.gateway.link.replicas.replica(op_id) for op_id, _ in warm}
            assert named == {r.address for r in replicas}
            running = gateway
            for op_id, _ in warm:
                await eventually(functools.partial(routed_stub_ready, running, op_id))
            before = [await asyncio.to_thread(scrape_stops, m) for m in metrics]
            stopped = [await started_and_stopped(client) for _ in range(6)]
            after = [await asyncio.to_thread(scrape_stops, m) for m in metrics]
        assert all(t.WhichOneof("kind") == "interrupted" for _, t in stopped)
        runners = {row.operation_id: row.runner_id for row in step_rows(postgres_url)}
        ran_on = {op_id: replicas[owner_index(replicas, runners[op_id])] for op_id, _ in stopped}
        for op_id, replica in ran_on.items():
            assert gateway.gateway.link.replicas.replica(op_id) == replica.address
        assert len(set(ran_on.values())) == 2, "one replica ran every operation"
        recorded = {
            here: sum(a.get(here, 0) - b.get(here, 0) for a, b in zip(after, before, strict=True))
            for here in ("true", "false")
        }
        assert recorded == {"true": 6, "false": 0}
    finally:
        if gateway is not None:
            await gateway.stop(grace=0)
        for replica in replicas:
            replica.close()


class FakeChannel:
    """What Replicas asks of a channel: its state and its closing."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    def get_state(self, try_to_connect: bool = False) -> Any:
        import grpc

        return grpc.ChannelConnectivity.READY

    async def close(self, grace: float | None = None) -> None:
        self.closed = True

    def __getattr__(self, name: str) -> Any:
        # The stub's methods (unary_unary, unary_stream): never called here.
        return lambda *args, **kwargs: None


async def test_replicas_no_remembered_operation_runs_on_give_their_channels_up_for_new_ones() -> (
    None
):
    """A rolling restart names new addresses: once MAX_REPLICAS channels are open, a new replica
    still gets one, in place of the replicas whose operations were all forgotten; while every
    open channel is in use, the new replica is not called directly."""
    opened: dict[str, FakeChannel] = {}

    def open_channel(address: str) -> Any:
        opened[address] = FakeChannel(address)
        return opened[address]

    def named(replica: str) -> list[tuple[str, str]]:
        return [(REPLICA_METADATA, replica)]

    replicas = Replicas(open_channel, capacity=1000)
    for i in range(MAX_REPLICAS):
        replicas.learn(f"op-{i}", named(f"old-{i}:50051"))
    # Every channel is in use: a replica beyond the bound is remembered nowhere.
    replicas.learn("op-new", named("new-0:50051"))
    assert replicas.replica("op-new") is None and "new-0:50051" not in opened
    # Two operations are now run by a replica already open (resumed there after their replicas
    # went away): old-0 and old-1 then run nothing remembered.
    replicas.learn("op-0", named("old-5:50051"))
    replicas.learn("op-1", named("old-5:50051"))
    replicas.learn("op-new", named("new-0:50051"))
    assert replicas.replica("op-new") == "new-0:50051"
    assert replicas.stub("op-new") is not None

    async def closed_old() -> bool:
        return opened["old-0:50051"].closed and opened["old-1:50051"].closed

    await eventually(closed_old)
    assert not any(opened[f"old-{i}:50051"].closed for i in range(2, MAX_REPLICAS))
    # Every remembered operation still has its replica's channel.
    assert all(replicas.stub(f"op-{i}") is not None for i in range(MAX_REPLICAS))
    await replicas.close()
    assert all(channel.closed for channel in opened.values())


async def test_a_replica_whose_operations_were_all_forgotten_gives_its_channel_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Routes are remembered least recently used first out (at owner_cache_size): a replica
    whose every route went that way is unused, and its channel makes room for a new one."""
    monkeypatch.setattr("gateway_service.replicas.MAX_REPLICAS", 2)
    opened: dict[str, FakeChannel] = {}

    def open_channel(address: str) -> Any:
        opened[address] = FakeChannel(address)
        return opened[address]

    replicas = Replicas(open_channel, capacity=2)
    replicas.learn("a", [(REPLICA_METADATA, "r1:1")])
    replicas.learn("b", [(REPLICA_METADATA, "r2:1")])
    replicas.learn("c", [(REPLICA_METADATA, "r2:1")])  # "a" is forgotten: r1 runs nothing known
    replicas.learn("d", [(REPLICA_METADATA, "r3:1")])  # "b" is forgotten too; r1 makes room
    assert replicas.replica("d") == "r3:1" and replicas.stub("d") is not None
    assert replicas.replica("a") is None and replicas.replica("c") == "r2:1"

    async def r1_closed() -> bool:
        return opened["r1:1"].closed

    await eventually(r1_closed)
    assert not opened["r2:1"].closed
    await replicas.close()
