"""One gateway in front of three runtime replicas (real processes, one PostgreSQL database):
round_robin spreads the work over all of them, and a replica frozen with SIGSTOP delays neither
stops nor watches for long.

No sleeps as synchronisation: every wait is a read of the next stream message (with a deadline)
or a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gateway_service.delivery import StopDelivery
from gateway_service.runtime_link import LoadBalancing
from gateway_service.server import start_gateway
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.credentials import gateway_channel
from tests.processes import RuntimeProcess, ServiceProcess
from tests.test_gateway import gateway_config, is_chunk, is_terminal, read_until, start_request
from tests.test_replicas import StartReplicas, owner_index, start_replicas, step_rows

if TYPE_CHECKING:
    Stub = pb_grpc.GatewayServiceAsyncStub

pytestmark = pytest.mark.postgres
__all__ = ["start_replicas"]  # the fixture, shared with tests/test_replicas.py

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_gateway_args(replicas: list[RuntimeProcess]) -> list[str]:
    """The Deployment section's `stopline gateway serve` line, with RT1..RT3 set to the
    replicas' addresses: the arguments after `serve`."""
    lines = re.findall(r"^stopline gateway serve --runtime \"ipv4:.*$", README.read_text(), re.M)
    assert len(lines) == 1, "the README's round_robin example is gone"
    env = {f"RT{i + 1}": r.address for i, r in enumerate(replicas)}
    expanded = re.sub(r"\$(RT\d)", lambda m: env[m.group(1)], lines[0])
    words = shlex.split(expanded)
    assert words[:3] == ["stopline", "gateway", "serve"]
    return words[3:]


@pytest.fixture
def gateways() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.close()


async def run_to_end(client: Stub, **settings: float) -> list[Any]:
    call = client.StartAndStream(start_request("ticker", settings))
    return await read_until(call, is_terminal, timeout=60)


async def test_round_robin_gateway_spreads_operations_over_three_replicas(
    postgres_url: str,
    start_replicas: StartReplicas,
    gateways: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    replicas = start_replicas(postgres_url, 3)
    gateway = ServiceProcess("gateway", tmp_path, readme_gateway_args(replicas))
    gateways.append(gateway)
    async with gateway_channel(gateway.address) as channel:
        client = pb_grpc.GatewayServiceStub(channel)
        runs = await asyncio.gather(
            *(run_to_end(client, steps=1, step_seconds=0.05) for _ in range(12))
        )
    assert {r[-1].event.WhichOneof("kind") for r in runs} == {"completed"}
    ran_on = {owner_index(replicas, row.runner_id) for row in step_rows(postgres_url)}
    assert ran_on == {0, 1, 2}, "some replica ran none of the work"


async def test_stops_and_watches_do_not_wait_on_a_frozen_replica(
    postgres_url: str, start_replicas: StartReplicas
) -> None:
    replicas = start_replicas(postgres_url, 3)
    target = "ipv4:" + ",".join(r.address for r in replicas)
    # The stop's answer must come back DELIVERED within 1.5 s: a delivery that waited out a
    # 2 s attempt on the frozen replica would answer PENDING.
    gateway = await start_gateway(
        gateway_config(
            target,
            runtime_load_balancing=LoadBalancing.ROUND_ROBIN,
            stop_ack_seconds=1.5,
            # No readiness probe between the stops: each call of a stop goes to the next replica
            # in the rotation, so at most two of its three can reach the frozen one.
            readiness_interval_seconds=60,
        )
    )
    deliveries: list[StopDelivery] = []
    deliver = gateway.gateway.deliverer.deliver

    def recording(*args: Any, **kwargs: Any) -> StopDelivery:
        delivery = deliver(*args, **kwargs)
        deliveries.append(delivery)
        return delivery

    gateway.gateway.deliverer.deliver = recording  # type: ignore[method-assign]
    frozen: RuntimeProcess | None = None
    try:
        async with gateway_channel(gateway.address) as channel:
            client = pb_grpc.GatewayServiceStub(channel)
            calls = [
                client.StartAndStream(
                    start_request(
                        "ticker",
                        {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 0.5},
                        pb.CANCEL_POLICY_KEEP_RUNNING,
                    )
                )
                for _ in range(6)
            ]
            firsts = await asyncio.gather(*(read_until(call, is_chunk) for call in calls))
            op_ids = [f[0].accepted.operation_id for f in firsts]
            owners = {
                row.operation_id: owner_index(replicas, row.runner_id)
                for row in step_rows(postgres_url)
            }
            # Freeze the replica that runs the most operations: their stops and watches must
            # go through the other two.
            counts = [list(owners.values()).count(i) for i in range(3)]
            frozen = replicas[counts.index(max(counts))]
            frozen.process.send_signal(signal.SIGSTOP)
            froze_at = time.monotonic()
            answers = await asyncio.gather(
                *(client.StopOperation(pb.StopOperationRequest(operation_id=i)) for i in op_ids)
            )
            assert [a.delivery for a in answers] == [pb.STOP_DELIVERY_DELIVERED] * len(op_ids)
            # Some stops went to the frozen replica first (it was still in the rotation) and were
            # answered by another one.
            assert len(deliveries) == len(op_ids)
            assert any(d.calls > 1 for d in deliveries), [d.calls for d in deliveries]
            assert all(d.attempts == 1 for d in deliveries), [d.attempts for d in deliveries]
            # Every client stream ends INTERRUPTED, those whose runtime watch went through the
            # frozen replica too (keepalive drops it; the watch resumes on another), and the
            # operations the frozen replica ran as well (taken over when its lease lapses).
            # Within 10 s: before the fix a watch on the frozen replica hung until gRPC's ping
            # timeout (a minute) ended it.
            rests = await asyncio.gather(
                *(read_until(call, is_terminal, timeout=10) for call in calls)
            )
            assert time.monotonic() - froze_at < 10
            assert {r[-1].event.WhichOneof("kind") for r in rests} == {"interrupted"}
            for first, rest in zip(firsts, rests, strict=True):
                seqs = [u.event.seq for u in first + rest if u.WhichOneof("update") == "event"]
                assert seqs == list(range(1, len(seqs) + 1)), f"gap or repeat: {seqs}"
    finally:
        if frozen is not None:
            frozen.process.send_signal(signal.SIGCONT)
        await gateway.stop(grace=0)
