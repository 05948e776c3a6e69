"""Stops sent straight to the replica that runs the operation (issue 17): runtime replicas as
separate OS processes on one PostgreSQL database, each serving its metrics, which say which way
each stop went (stopline_runtime_stop_forwards_total on the replica that recorded it,
stopline_runtime_stop_paths_total on the one that ran it)."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from runtime_service.config import advertised_address
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb
from tests.processes import RuntimeProcess, free_port, owner_of
from tests.test_replicas import REPLICA_ARGS, channel_stubs, start_op, watch

if TYPE_CHECKING:
    from tests.test_replicas import Stub

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parent.parent


class Replica:
    def __init__(self, process: RuntimeProcess, metrics: str) -> None:
        self.process = process
        self.metrics = metrics

    def counter(self, name: str, **labels: str) -> float:
        """The counter's value, summed over the label values not given."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


StartReplicas = Callable[..., list[Replica]]


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[StartReplicas]:
    started: list[Replica] = []
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def start(
        url: str, *per_replica: tuple[str, ...], port: list[int] | None = None
    ) -> list[Replica]:
        new = []
        for i, extra in enumerate(per_replica):
            metrics = f"127.0.0.1:{free_port()}"
            process = RuntimeProcess(
                url,
                tmp_path,
                port=port[i] if port else None,
                extra_args=(*REPLICA_ARGS, "--metrics-address", metrics, *extra),
                env=env,
            )
            new.append(Replica(process, metrics))
        started.extend(new)
        return new

    yield start
    for replica in started:
        replica.process.close()


async def started(stub: Stub, agent: str) -> str:
    """An operation with a long first step, on whichever replica claims it."""
    if agent == "ticker":
        return await start_op(stub, steps=2, step_seconds=30, chunk_interval_seconds=5)
    reply = await stub.StartOperation(pb.StartOperationRequest(agent=agent))
    return reply.operation.id


async def wait_mid_step(stub: Stub, op_id: str) -> None:
    async for event in watch(stub, op_id):
        if event.WhichOneof("kind") == "output_chunk":
            return


async def halted(stub: Stub, op_id: str) -> pb.GetOperationResponse:
    deadline = time.monotonic() + 30
    while True:
        reply = await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))
        if reply.operation.status == op_pb.OPERATION_STATUS_INTERRUPTED:
            return reply
        assert time.monotonic() < deadline, "the stop never halted the operation"
        await asyncio.sleep(0.05)


async def stop_from_the_other(
    url: str, replicas: list[Replica], agent: str = "ticker"
) -> tuple[Replica, Replica, list[aio.Channel], list[Stub], str]:
    channels, stubs = await channel_stubs([r.process for r in replicas])
    op_id = await started(stubs[0], agent)
    await wait_mid_step(stubs[0], op_id)
    owner_process = owner_of([r.process for r in replicas], url, op_id)
    owner = next(r for r in replicas if r.process is owner_process)
    other = next(r for r in replicas if r is not owner)
    reply = await stubs[replicas.index(other)].InterruptOperation(
        pb.InterruptOperationRequest(operation_id=op_id, requested_by="test")
    )
    assert reply.outcome == pb.INTERRUPT_OUTCOME_ACCEPTED
    return owner, other, channels, stubs, op_id


async def test_a_stop_recorded_on_another_replica_reaches_the_owner_directly(
    postgres_url: str, replicas: StartReplicas
) -> None:
    # The stubborn agent keeps its run alive for the stop grace after the stop reaches it,
    # whichever way came first: the direct call then always finds the run.
    stubborn = ("--agent", "stubborn=tests.agents:StubbornAgent", "--stop-grace", "3")
    both = replicas(postgres_url, stubborn, stubborn)
    owner, other, channels, stubs, op_id = await stop_from_the_other(postgres_url, both, "stubborn")
    try:
        await halted(stubs[0], op_id)
        forwards = "stopline_runtime_stop_forwards_total"
        assert other.counter(forwards, outcome="running") == 1
        assert owner.counter(forwards) == 0  # the owner recorded nothing, sent nothing
        paths = "stopline_runtime_stop_paths_total"
        direct = owner.counter(paths, path="direct")
        notified = owner.counter(paths, path="notification")
        assert direct + notified == 1, "the stop reached the run once, first by one path"
        assert other.counter(paths) == 0  # counted where the run is, only
    finally:
        for channel in channels:
            await channel.close(grace=None)


@pytest.mark.parametrize("routing", ["unreachable", "not_running", "no_route"])
async def test_a_stop_with_stale_or_no_route_is_carried_by_the_notification(
    postgres_url: str, replicas: StartReplicas, routing: str
) -> None:
    ports = [free_port(), free_port()]
    if routing == "unreachable":  # advertised where nothing listens (NAT, a wrong setting)
        advertised = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    elif routing == "not_running":  # each at the other's address: a live replica, the wrong one
        advertised = [f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[0]}"]
    else:
        advertised = ["off", "off"]
    both = replicas(
        postgres_url, *(("--advertise-address", address) for address in advertised), port=ports
    )
    owner, other, channels, stubs, op_id = await stop_from_the_other(postgres_url, both)
    try:
        final = await halted(stubs[0], op_id)
        assert final.operation.status == op_pb.OPERATION_STATUS_INTERRUPTED

        async def counted() -> None:
            deadline = time.monotonic() + 10
            while other.counter("stopline_runtime_stop_forwards_total", outcome=routing) != 1:
                assert time.monotonic() < deadline, f"no {routing} forward counted"
                await asyncio.sleep(0.05)

        await counted()
        paths = "stopline_runtime_stop_paths_total"
        assert owner.counter(paths, path="direct") == 0
        assert owner.counter(paths, path="notification") + owner.counter(paths, path="stored") == 1
    finally:
        for channel in channels:
            await channel.close(grace=None)


async def test_a_dead_owners_operation_is_still_stopped_by_the_takeover(
    postgres_url: str, replicas: StartReplicas
) -> None:
    both = replicas(postgres_url, (), ())
    channels, stubs = await channel_stubs([r.process for r in both])
    try:
        op_id = await start_op(stubs[0], steps=3, step_seconds=30)
        await wait_mid_step(stubs[0], op_id)
        owner_process = owner_of([r.process for r in both], postgres_url, op_id)
        survivor = next(r for r in both if r.process is not owner_process)
        owner_process.kill()
        stub = stubs[both.index(survivor)]
        await stub.InterruptOperation(pb.InterruptOperationRequest(operation_id=op_id))
        events = [e async for e in watch(stub, op_id)]
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds[-1] == "interrupted" and kinds.count("started") == 1  # never resumed
        # The direct call found nobody at the dead owner's address; the takeover halted it.
        assert survivor.counter("stopline_runtime_stop_forwards_total", outcome="unreachable") == 1
        assert survivor.counter("stopline_runtime_lease_takeovers_total", outcome="halted") == 1
    finally:
        for channel in channels:
            await channel.close(grace=None)


def test_the_advertised_address_defaults_to_the_bound_one() -> None:
    assert advertised_address("127.0.0.1:50051", 50051, None) == "127.0.0.1:50051"
    assert advertised_address("127.0.0.1:0", 41234, None) == "127.0.0.1:41234"
    assert advertised_address("10.0.0.5:50051", 50051, "runtime-0.runtime:50051") == (
        "runtime-0.runtime:50051"
    )
    assert advertised_address("0.0.0.0:50051", 50051, "off") is None
    wildcard = advertised_address("0.0.0.0:50051", 50051, None)
    assert wildcard is not None and wildcard.endswith(":50051")
    assert not wildcard.startswith("0.0.0.0")
    assert advertised_address("[::]:50051", 50051, None) != "[::]:50051"
