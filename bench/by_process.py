"""Which process Stopline's cost over the floor is spent in: its gateway, its runtime, or the two
together (issue 17).

    python -m bench.by_process [--steps 0.01,1] [--trials 30]

On SQLite a stop's database writes cost about nothing over the floor (bench.durable_floor), so
the gap between Stopline and the floor is Stopline's own code. Swapping each of the floor's two
servers for Stopline's, one at a time, tells where that code costs. Four paths, all up at once,
measured round by round at the same pause (their order shuffled each round):

* **floor**: client → the floor's relay → the floor's backend (bench/floor.py);
* **runtime alone**: client → the floor's relay → Stopline's runtime, on a `ticker` started on
  the runtime directly (the relay calls WatchOperation and InterruptOperation, as the gateway
  does);
* **gateway alone**: client → Stopline's gateway → the floor's backend (which answers the
  gateway's ownership read with a recorded operation);
* **Stopline**: client → Stopline's gateway → Stopline's runtime (the table's same-connection
  stop).

Each trial waits for the stream's first output chunk, pauses, and times the stop call's return
(acknowledgment) and the terminal event's arrival. If the costs add up, (runtime alone - floor)
plus (gateway alone - floor) is (Stopline - floor); what does not add up is the two processes'
interaction (the gateway's stream notices, a runtime's fan-out to its watchers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from bench import floor, shapes
from bench.scenarios import Clients, _is_terminal, warm_up
from bench.stack import Stack
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from stopline.transport import open_channel
from stopline.v1 import runtime_service_pb2 as rt
from tests.credentials import TOKEN, WithToken
from tests.processes import GatewayProcess

ms = 1000.0
PATHS = ("floor", "runtime alone", "gateway alone", "Stopline")
Trial = Callable[[float, float], Awaitable[tuple[float, float]]]


async def _stop_and_wait(call: Any, stopper: Any, op_id: str) -> tuple[float, float]:
    """The stop's acknowledgment and its terminal event on `call`'s stream, ms from the send."""
    began = time.perf_counter()
    await stopper.StopOperation(gw.StopOperationRequest(operation_id=op_id, reason=floor.PUSH))
    ack = (time.perf_counter() - began) * ms
    async for update in call:
        if _is_terminal(update):
            call.cancel()
            return ack, (time.perf_counter() - began) * ms
    raise RuntimeError(f"the stream of {op_id} ended without a terminal event")


async def _first_chunk(call: Any) -> None:
    async for update in call:
        if (
            update.WhichOneof("update") == "event"
            and update.event.WhichOneof("kind") == "output_chunk"
        ):
            return
    raise RuntimeError("the stream ended before its first output chunk")


class Paths:
    """The four paths' processes and clients, up for the whole run."""

    def __init__(self, stack: Stack, workdir: Path) -> None:
        self._stack = stack
        self._workdir = workdir
        self._servers: list[Any] = []
        self._channels: list[Any] = []
        self._clients: Clients | None = None
        self._counter = 0

    async def open(self) -> dict[str, Trial]:
        messages = self._workdir / "floor-messages.bin"
        await floor.record(self._stack, messages)
        backend = self._keep(floor.Server("backend", str(messages)))
        relay = self._keep(floor.Server("relay", backend.address))
        runtime_relay = self._keep(floor.Server("relay", self._stack.runtimes[0].address))
        gateway = self._keep(GatewayProcess(backend.address, self._workdir))
        clients = self._clients = Clients(self._stack)
        return {
            "floor": self._floor_trial(self._stub(relay.address)),
            "runtime alone": self._runtime_trial(
                self._stub(runtime_relay.address), clients.runtimes[0]
            ),
            "gateway alone": self._floor_trial(self._stub(gateway.address)),
            "Stopline": partial(shapes.stop_trial, clients.gateways[0]),
        }

    def _keep(self, server: Any) -> Any:
        self._servers.append(server)
        return server

    def _stub(self, address: str) -> Any:
        channel = open_channel(address)
        self._channels.append(channel)
        return WithToken(gw_grpc.GatewayServiceStub(channel), TOKEN)

    def _floor_trial(self, stub: Any) -> Trial:
        """A trial on the floor's backend (through its relay or through a gateway)."""

        async def trial(step: float, pause: float) -> tuple[float, float]:
            self._counter += 1
            op_id = floor.trial_id(self._counter, step)
            call = stub.StreamOperation(gw.StreamOperationRequest(operation_id=op_id))
            await _first_chunk(call)
            await asyncio.sleep(pause)
            return await _stop_and_wait(call, stub, op_id)

        return trial

    def _runtime_trial(self, stub: Any, runtime: Any) -> Trial:
        """A `ticker` started on the runtime directly, streamed and stopped through the relay."""

        async def trial(step: float, pause: float) -> tuple[float, float]:
            values = struct_pb2.Struct()
            values.update(
                {"steps": 2, "step_seconds": step, "chunk_interval_seconds": max(step / 4, 0.005)}
            )
            started = await runtime.StartOperation(
                rt.StartOperationRequest(agent="ticker", input=values)
            )
            op_id = started.operation.id
            call = stub.StreamOperation(gw.StreamOperationRequest(operation_id=op_id))
            await _first_chunk(call)
            await asyncio.sleep(pause)
            return await _stop_and_wait(call, stub, op_id)

        return trial

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(grace=None)
        if self._clients is not None:
            await self._clients.close()
        for server in reversed(self._servers):
            server.close()


async def compare(steps: list[float], trials: int) -> dict[str, Any]:
    """For each step length, `trials` rounds of the four paths at one pause each: the samples
    of each path's acknowledgment and terminal event."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, Stack("sqlite", Path(tmp)) as stack:
        await warm_up(stack, gateway=0)
        paths = Paths(stack, Path(tmp))
        try:
            run = await paths.open()
            rng = random.Random(1)
            for step in steps:
                samples: dict[str, dict[str, list[float]]] = {
                    name: {"ack": [], "halt": []} for name in PATHS
                }
                for _ in range(trials):
                    pause = rng.uniform(0, min(step, 1.0) * 0.5)
                    order = list(PATHS)
                    rng.shuffle(order)
                    for name in order:
                        ack, halt = await run[name](step, pause)
                        samples[name]["ack"].append(ack)
                        samples[name]["halt"].append(halt)
                out[f"{step:g}s"] = samples
        finally:
            await paths.close()
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        "| step | figure | floor | runtime alone | gateway alone | Stopline "
        "| runtime's part | gateway's part | not adding up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ack": "acknowledgment", "halt": "stop → terminal event"}
    for step, samples in results.items():
        for kind, name in names.items():
            m = {path: statistics.median(samples[path][kind]) for path in PATHS}
            runtime_part = m["runtime alone"] - m["floor"]
            gateway_part = m["gateway alone"] - m["floor"]
            rest = m["Stopline"] - m["floor"] - runtime_part - gateway_part
            lines.append(
                f"| {step} | {name} | {m['floor']:.2f} ms | {m['runtime alone']:.2f} ms "
                f"| {m['gateway alone']:.2f} ms | {m['Stopline']:.2f} ms "
                f"| {runtime_part:+.2f} ms | {gateway_part:+.2f} ms | {rest:+.2f} ms |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default="0.01,1", help="step lengths, seconds")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    steps = [float(step) for step in args.steps.split(",")]
    results = asyncio.run(compare(steps, args.trials))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
