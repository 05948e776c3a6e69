"""The floor: what a stop can cost at best on this machine, measured in the same run (issue 17).

The same topology as a stop through Stopline, with no logic in it: the client (the benchmark
process), a relay server (in the gateway's place) and a backend server (in the runtime's place),
three processes on the same host, talking grpc.aio with Stopline's own protos and with messages
recorded from a real stop on the stack under test, so the bytes on the wire match.

* **(a) unary**: ``StopOperation`` client → relay, relayed as ``InterruptOperation`` to the
  backend, which answers at once; the relay answers the client. What a stop's acknowledgment
  can cost at best.
* **(b) push**: the same call, but the backend also pushes the recorded terminal event on the
  ``WatchOperation`` stream the relay holds for the client's ``StreamOperation``; the figure is
  call sent → that event received by the client. What stop → terminal event (and start → first
  step event) can cost at best.

The client paces trials exactly as :func:`bench.scenarios.stop_latency` does (same seed, same
pause after the stream's first chunk, per step length), and the backend sends a recorded output
chunk on the stream every ``max(step / 4, 5 ms)`` as the ``ticker`` agent does: idle processes on
this VM cost more per call than busy ones, so the floor must be exactly as idle as the stops.
The backend learns the chunk period from the operation id (a UUID whose last group is the
period in µs: ``trial_id``), the one field the relay passes on unchanged (and a gateway too,
bench/by_process.py); whether to push comes in ``reason`` (``push``/``ack``).

    python -m bench.floor backend MESSAGES_FILE [DATABASE_URL]   # prints "ready PORT"
    python -m bench.floor relay BACKEND_ADDRESS                  # prints "ready PORT"

With a DATABASE_URL the backend is the *durable* floor (bench/floor_store.py, used by
bench/durable_floor.py): before answering it makes the stop's durable write, and before pushing
the terminal event the halt's, as any design must that acknowledges only stops that survive a
crash.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from grpc import aio

from bench.floor_store import Store, open_store
from bench.stack import REPO, Stack
from bench.stats import summary
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from stopline.serving import add_health_and_reflection
from stopline.transport import open_channel
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import SERVICE_TOKEN, TOKEN, WithToken

ms = 1000.0
PUSH, ACK = "push", "ack"
STEPS = (0.01, 1.0, 30.0)


def chunk_period(step_seconds: float) -> float:
    """The `ticker` agent's chunk interval in the stop scenarios (bench/scenarios.stop_latency)."""
    return max(step_seconds / 4, 0.005)


def trial_id(counter: int, step_seconds: float) -> str:
    """A floor trial's operation id: a well-formed UUID (a gateway in front of the backend
    refuses anything else) whose last group carries the chunk period in µs for the backend."""
    return f"{counter:08x}-0000-4000-8000-{round(chunk_period(step_seconds) * 1e6):012d}"


# ---------------------------------------------------------------------------------------------
# The messages: recorded from one real stop through the gateway
# ---------------------------------------------------------------------------------------------


async def record(stack: Stack, path: Path) -> None:
    """One real stop through the stack's gateway; keep its answer, an output chunk and the
    terminal event, so the floor sends the same messages (sizes) as Stopline does."""
    from bench.scenarios import Clients, _is_terminal, _start

    clients = Clients(stack)
    try:
        gateway = clients.gateways[0]
        call = gateway.StartAndStream(
            _start("ticker", steps=2, step_seconds=1.0, chunk_interval_seconds=0.25)
        )
        op_id, chunk = "", None
        async for update in call:
            if update.WhichOneof("update") == "accepted":
                op_id = update.accepted.operation_id
            elif update.event.WhichOneof("kind") == "output_chunk":
                chunk = update.event
                break
        answer = await gateway.StopOperation(
            gw.StopOperationRequest(operation_id=op_id, reason="bench")
        )
        terminal = None
        async for update in call:
            if _is_terminal(update):
                terminal = update.event
                break
    finally:
        await clients.close()
    assert chunk is not None and terminal is not None
    with path.open("wb") as out:
        for message in (answer, chunk, terminal):
            raw = message.SerializeToString()
            out.write(len(raw).to_bytes(4, "big") + raw)


def load(path: Path) -> tuple[gw.StopOperationResponse, op_pb.Event, op_pb.Event]:
    data = path.read_bytes()
    parts: list[bytes] = []
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        parts.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    answer, chunk, terminal = parts
    return (
        gw.StopOperationResponse.FromString(answer),
        op_pb.Event.FromString(chunk),
        op_pb.Event.FromString(terminal),
    )


# ---------------------------------------------------------------------------------------------
# The two servers: no storage, no validation, no fan-out
# ---------------------------------------------------------------------------------------------


class Backend(rt_grpc.RuntimeServiceServicer):
    """In the runtime's place: answers InterruptOperation at once and, when asked, pushes the
    terminal event on the operation's WatchOperation stream. With a `store` (the durable
    floor), the answer waits for the stop's write and the push for the halt's, made after the
    answer as the runtime's runner makes it."""

    def __init__(self, path: Path, store: Store | None = None) -> None:
        answer, self._chunk, self._terminal = load(path)
        self._answer = rt.InterruptOperationResponse(
            outcome=answer.outcome, operation=answer.operation
        )
        self._streams: dict[str, asyncio.Event] = {}
        self._store = store
        self._halts: set[asyncio.Task[None]] = set()
        self._operation = answer.operation

    async def GetOperation(
        self, request: rt.GetOperationRequest, context: Any
    ) -> rt.GetOperationResponse:
        """The recorded operation under the asked id: what a gateway reads before it streams an
        operation it has not seen (its owner), bench/by_process.py."""
        operation = op_pb.Operation()
        operation.CopyFrom(self._operation)
        operation.id = request.operation_id
        operation.status = op_pb.OPERATION_STATUS_RUNNING
        return rt.GetOperationResponse(operation=operation)

    async def WatchOperation(
        self, request: rt.WatchOperationRequest, context: Any
    ) -> AsyncGenerator[rt.WatchOperationResponse, None]:
        period = int(request.operation_id.rsplit("-", 1)[1]) / 1e6
        stopped = self._streams[request.operation_id] = asyncio.Event()
        chunk = rt.WatchOperationResponse(events=[self._chunk])
        if self._store is not None:
            await self._store.begin(request.operation_id)
        try:
            while True:
                yield chunk
                try:
                    await asyncio.wait_for(stopped.wait(), period)
                except TimeoutError:
                    continue
                yield rt.WatchOperationResponse(events=[self._terminal])
                return
        finally:
            self._streams.pop(request.operation_id, None)

    async def InterruptOperation(
        self, request: rt.InterruptOperationRequest, context: Any
    ) -> rt.InterruptOperationResponse:
        if self._store is None:
            if request.reason == PUSH:
                self._streams[request.operation_id].set()
            return self._answer
        await self._store.stop(request.operation_id)
        if request.reason == PUSH:
            halt = asyncio.create_task(self._halt(request.operation_id))
            self._halts.add(halt)
            halt.add_done_callback(self._halts.discard)
        return self._answer

    async def _halt(self, operation_id: str) -> None:
        assert self._store is not None
        await self._store.halt(operation_id)
        self._streams[operation_id].set()


class Relay(gw_grpc.GatewayServiceServicer):
    """In the gateway's place: one channel to the backend, calls passed on with the service
    credential as metadata (as the gateway's link does), responses translated, nothing else."""

    def __init__(self, backend: str) -> None:
        self._channel = open_channel(backend)
        self._backend = WithToken(rt_grpc.RuntimeServiceStub(self._channel), SERVICE_TOKEN)

    async def StreamOperation(
        self, request: gw.StreamOperationRequest, context: Any
    ) -> AsyncGenerator[gw.StreamOperationResponse, None]:
        watch = self._backend.WatchOperation(
            rt.WatchOperationRequest(operation_id=request.operation_id, batch=True)
        )
        async for message in watch:
            for event in message.events:
                yield gw.StreamOperationResponse(event=event)

    async def StopOperation(
        self, request: gw.StopOperationRequest, context: Any
    ) -> gw.StopOperationResponse:
        answer = await self._backend.InterruptOperation(
            rt.InterruptOperationRequest(
                operation_id=request.operation_id, requested_by="floor", reason=request.reason
            )
        )
        return gw.StopOperationResponse(
            delivery=gw.STOP_DELIVERY_DELIVERED, outcome=answer.outcome, operation=answer.operation
        )


async def serve(role: str, arg: str, database: str | None = None) -> None:
    server = aio.server()
    # Each serves only the calls the floor makes; the others stay unimplemented (abstract).
    store = None if database is None else await open_store(database)
    if role == "backend":
        backend = Backend(Path(arg), store)  # type: ignore[abstract]
        rt_grpc.add_RuntimeServiceServicer_to_server(backend, server)
        # SERVING, as a runtime answers: a gateway in front of the backend probes it.
        service = rt.DESCRIPTOR.services_by_name["RuntimeService"].full_name
        await add_health_and_reflection(server, [service], with_reflection=False)
    else:
        relay = Relay(arg)  # type: ignore[abstract]
        gw_grpc.add_GatewayServiceServicer_to_server(relay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)
    if store is not None:
        await store.close()


class Server:
    """`python -m bench.floor ROLE ARG` as a process of its own."""

    def __init__(self, role: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", role, *args], stdout=subprocess.PIPE, cwd=REPO
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().split()
        if line[:1] != ["ready"]:
            self.close()
            raise RuntimeError(f"bench.floor {role} did not start: {line!r}")
        self.address = f"127.0.0.1:{line[1]}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# The client: paced like the stop scenarios
# ---------------------------------------------------------------------------------------------


async def _trial(stub: Any, name: str, mode: str, pause: float) -> float:
    """Open the stream, wait for its first chunk, pause, send the call; time the call's return
    (ack) or the pushed event's arrival (push)."""
    call = stub.StreamOperation(gw.StreamOperationRequest(operation_id=name))
    updates = aiter(call)
    await anext(updates)  # the first chunk: the stream is established end to end
    await asyncio.sleep(pause)
    began = time.perf_counter()
    await stub.StopOperation(gw.StopOperationRequest(operation_id=name, reason=mode))
    if mode == ACK:
        elapsed = (time.perf_counter() - began) * ms
        call.cancel()
        return elapsed
    async for update in updates:
        if update.event.WhichOneof("kind") != "output_chunk":
            return (time.perf_counter() - began) * ms
    raise RuntimeError("the floor's stream ended without the pushed event")


class Floor:
    """The floor's relay and backend, up beside a stack for as long as its scenarios run, so
    that a scenario can interleave a floor trial with each of its own (see `trial`)."""

    def __init__(self, backend: Server, relay: Server) -> None:
        self._backend = backend
        self._relay = relay
        self._channel = open_channel(relay.address)
        self._stub = WithToken(gw_grpc.GatewayServiceStub(self._channel), TOKEN)
        self._counter = 0

    @classmethod
    async def open(cls, stack: Stack, workdir: Path, database: str | None = None) -> Floor:
        """Messages recorded from `stack` (running, idle), then relay and backend processes of
        their own; with `database`, the durable floor's backend (writes to that database)."""
        path = workdir / "floor-messages.bin"
        await record(stack, path)
        backend = Server("backend", str(path), *([database] if database else []))
        try:
            return cls(backend, Server("relay", backend.address))
        except BaseException:
            backend.close()
            raise

    async def trial(self, step: float, mode: str, pause: float) -> float:
        """One trial paced as a stop trial at `step` with that pause: the call's return (ACK)
        or the pushed event's arrival (PUSH), in ms."""
        self._counter += 1
        return await _trial(self._stub, trial_id(self._counter, step), mode, pause)

    async def unary(self, step: float, pause: float) -> float:
        """A floor (a) trial (scenarios.Floor)."""
        return await self.trial(step, ACK, pause)

    async def push(self, step: float, pause: float) -> float:
        """A floor (b) trial (scenarios.Floor)."""
        return await self.trial(step, PUSH, pause)

    async def close(self) -> None:
        await self._channel.close(grace=None)
        self._relay.close()
        self._backend.close()


async def measure(floor_: Floor, trials: dict[float, int], seed: int = 1) -> dict[str, Any]:
    """For each step length: `n` unary trials and `n` push trials, interleaved, each with the
    pause stop_latency would draw for the same trial (same seed, same formula)."""
    out: dict[str, dict[str, Any]] = {}
    for step, n in trials.items():
        rng = random.Random(seed)
        samples: dict[str, list[float]] = {ACK: [], PUSH: []}
        for _ in range(n):
            pause = rng.uniform(0, min(step, 1.0) * 0.5)
            for mode in (ACK, PUSH):
                samples[mode].append(await floor_.trial(step, mode, pause))
        out[f"{step:g}s"] = {
            "unary_ms": summary(samples[ACK]),
            "push_ms": summary(samples[PUSH]),
            "trials": n,
            "chunk_period_ms": chunk_period(step) * 1000,
        }
    return out


async def floor(
    stack: Stack, workdir: Path, trials: dict[float, int], floor_: Floor | None = None
) -> dict[str, Any]:
    """The floor beside `stack`, measured in a block of its own (`floor_`: processes already
    up; else they are started, from messages recorded on `stack`, and stopped after)."""
    opened = floor_ or await Floor.open(stack, workdir)
    try:
        by_step = await measure(opened, trials)
    finally:
        if floor_ is None:
            await opened.close()
    return {
        "how": "grpc.aio client -> relay -> backend, three processes, recorded messages",
        **by_step,
    }


def pooled(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One floor from two measured around the figures it divides (before and after them, in the
    same stack's minutes): each step length's samples of both, summarised together. A floor
    measured once, minutes before, moved by up to 40 % between runs while Stopline's figures
    moved less, so a run whose floor happened to be fast read worse for no change of the code;
    pooling the two makes the ratio less hostage to one moment of the VM. Both halves are kept
    in the results (`floor_before`, `floor_after`)."""
    out: dict[str, Any] = {"how": f"{before.get('how', '')}; pooled, before and after"}
    for step, first in before.items():
        second = after.get(step)
        if not isinstance(first, dict) or not isinstance(second, dict):
            continue
        out[step] = {
            "unary_ms": summary(first["unary_ms"]["samples"] + second["unary_ms"]["samples"]),
            "push_ms": summary(first["push_ms"]["samples"] + second["push_ms"]["samples"]),
            "trials": first["trials"] + second["trials"],
            "chunk_period_ms": first["chunk_period_ms"],
        }
    return out


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], *sys.argv[3:4]))
