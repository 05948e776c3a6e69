"""Stopline's benchmark scenarios, measured from a client process through the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import struct_pb2

from bench.stack import Stack
from bench.stats import summary
from stopline import tracing
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from stopline.transport import bearer_metadata, open_channel
from stopline.v1 import runtime_service_pb2 as rt
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import SERVICE_TOKEN, TOKEN, WithToken

if TYPE_CHECKING:
    GatewayStub = gw_grpc.GatewayServiceAsyncStub

TERMINAL = ("completed", "failed", "interrupted")


class Floor(Protocol):
    """Floor trials to pair with a scenario's own (bench.floor.Floor), each paced as a stop trial
    at `step` seconds with that pause; their times in ms."""

    async def unary(self, step: float, pause: float) -> float: ...

    async def push(self, step: float, pause: float) -> float: ...


class Pairing:
    """The floor trials paired with a scenario's stops: one of each kind, (a) and (b), beside
    each stop at its pause, the floor's first in even trials and last in odd ones (the VM's
    drift then falls on both alike). Without a floor, nothing is run and nothing reported."""

    def __init__(self, floor: Floor | None) -> None:
        self._floor = floor
        self._unary: list[float] = []
        self._push: list[float] = []

    async def before(self, trial: int, step: float, pause: float) -> None:
        if trial % 2 == 0:
            await self._both(step, pause)

    async def after(self, trial: int, step: float, pause: float) -> None:
        if trial % 2 == 1:
            await self._both(step, pause)

    async def _both(self, step: float, pause: float) -> None:
        if self._floor is not None:
            self._unary.append(await self._floor.unary(step, pause))
            self._push.append(await self._floor.push(step, pause))

    def report(self, out: dict[str, Any], client: str = "stop") -> None:
        """Put the floor trials in the scenario's result `out` (as `floor`), if there were any."""
        if self._floor is not None:
            out["floor"] = {
                "how": f"interleaved: a trial of each kind beside each {client}, at its pause",
                "unary_ms": summary(self._unary),
                "push_ms": summary(self._push),
            }


ms = 1000.0


def _input(**values: float) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _start(agent: str, **values: float) -> gw.StartAndStreamRequest:
    return gw.StartAndStreamRequest(
        agent=agent, input=_input(**values), cancel_policy=gw.CANCEL_POLICY_KEEP_RUNNING
    )


def _is_terminal(update: Any) -> bool:
    return update.WhichOneof("update") == "event" and update.event.WhichOneof("kind") in TERMINAL


class WithTokenAndTrace:
    """WithToken, plus the current trace context in each call's metadata (computed per call, as
    the gateway sends it to the runtime): the benchmark client with tracing on sends
    `traceparent` as the `stopline` command does, still without an aio interceptor (~150 µs a
    call, which neither arm's client pays)."""

    def __init__(self, stub: Any, token: str) -> None:
        self._stub = stub
        self._metadata = bearer_metadata(token)

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._stub, method)

        def traced(*args: Any, **kwargs: Any) -> Any:
            return call(*args, metadata=tracing.outgoing_metadata(self._metadata), **kwargs)

        return traced


def gateway_stub(channel: Any) -> Any:
    """The gateway's stub as the benchmark client calls it: with tracing switched on in this
    process (`stopline.tracing.install`, the observability scenario's "on" arm) its calls carry
    the trial's trace context; off, exactly the lean client of every other figure."""
    stub = gw_grpc.GatewayServiceStub(channel)
    return WithTokenAndTrace(stub, TOKEN) if tracing.enabled() else WithToken(stub, TOKEN)


def trial_span(name: str) -> contextlib.AbstractContextManager[Any]:
    """With tracing on in this process, one client span per trial, the root of its trace (as a
    `stopline run` command's span is); off, nothing at all."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    return tracing.tracer().start_as_current_span(name)


class Clients:
    def __init__(self, stack: Stack) -> None:
        # Credentials as call metadata (tests.credentials.WithToken), as a lean client sends them.
        self.channels = [open_channel(g.address) for g in stack.gateways]
        self.gateways = [gateway_stub(c) for c in self.channels]
        self.rt_channels = [open_channel(r.address) for r in stack.runtimes]
        self.runtimes = [
            WithToken(rt_grpc.RuntimeServiceStub(c), SERVICE_TOKEN) for c in self.rt_channels
        ]

    async def close(self) -> None:
        for channel in [*self.channels, *self.rt_channels]:
            await channel.close(grace=None)


OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
"""Channel option for a client that must not share a connection: gRPC otherwise reuses one TCP
connection for every channel of a process to the same address (its global subchannel pool)."""


async def ticking(gateway: Any, step_seconds: float) -> tuple[Any, str]:
    """A `ticker` of two steps started through `gateway` and streaming its first output chunk
    (a stop trial's operation): its stream, still open, and its id."""
    call = gateway.StartAndStream(
        _start(
            "ticker",
            steps=2,
            step_seconds=step_seconds,
            chunk_interval_seconds=max(step_seconds / 4, 0.005),
        )
    )
    op_id = ""
    async for update in call:
        if update.WhichOneof("update") == "accepted":
            op_id = update.accepted.operation_id
        event = update.event if update.WhichOneof("update") == "event" else None
        if event is not None and event.WhichOneof("kind") == "output_chunk":
            break
    return call, op_id


async def stop_latency(
    stack: Stack,
    step_seconds: float,
    trials: int,
    cross_replica: bool = False,
    seed: int = 1,
    own_connection: bool = False,
    gateway: int = 0,
    floor: Floor | None = None,
) -> dict[str, Any]:
    """Stop at a random moment inside a step; time the stop call's return (acknowledgment) and
    the stop call -> terminal event received on the client's stream (halt). With
    `own_connection`, the stop comes from a second client on a connection of its own (another
    service, another tab), not on the streaming client's connection (issue 17). `gateway`: the
    index of the stack's gateway to start and stop through.

    With `floor`, each trial is paired with a floor trial of each kind, (a) and (b), at the same
    pause, in alternating order (the floor's first in even trials, last in odd ones): the
    result's `floor` is then measured at the same moments of the VM as the stops it divides,
    which a floor measured in a block before and after them is not (this VM's speed drifts
    within minutes: one run's ratio to such a floor moved by up to 2.6 between runs of one
    code, against up to 0.9 paired; BENCHMARKS.md)."""
    rng = random.Random(seed)
    clients = Clients(stack)
    second = None
    if own_connection:
        second = open_channel(stack.gateways[gateway].address, options=[OWN_CONNECTION])
    ack: list[float] = []
    halt: list[float] = []
    server_halt: list[float] = []
    pairing = Pairing(floor)
    mid_step = 0
    try:
        for trial in range(trials):
            pause = rng.uniform(0, min(step_seconds, 1.0) * 0.5)
            await pairing.before(trial, step_seconds, pause)
            with trial_span("stop trial"):
                call, op_id = await ticking(clients.gateways[gateway], step_seconds)
                stopper = clients.gateways[gateway]
                if cross_replica:
                    stopper = clients.gateways[1 - stack.owner(op_id)]
                if second is not None:
                    stopper = gateway_stub(second)
                await asyncio.sleep(pause)
                began = time.perf_counter()
                await stopper.StopOperation(
                    gw.StopOperationRequest(operation_id=op_id, reason="bench")
                )
                ack.append((time.perf_counter() - began) * ms)
                async for update in call:
                    if _is_terminal(update):
                        halt.append((time.perf_counter() - began) * ms)
                        if update.event.WhichOneof("kind") == "interrupted":
                            server_halt.append(update.event.interrupted.halt_ms)
                            mid_step += int(update.event.interrupted.mid_step)
                        break
            await pairing.after(trial, step_seconds, pause)
    finally:
        await clients.close()
        if second is not None:
            await second.close(grace=None)
    out: dict[str, Any] = {
        "stop_connection": "own" if own_connection else "same",
        "ack_ms": summary(ack),
        "halt_ms": summary(halt),
        "runtime_halt_ms": summary(server_halt),
        "mid_step": mid_step,
        "trials": trials,
    }
    pairing.report(out)
    return out


async def warm_up(stack: Stack, gateway: int, operations: int = 4) -> None:
    """Run a few short operations through `gateway` to their end: a gateway over several
    replicas has then heard each name itself and connected to it, before anything is timed."""
    clients = Clients(stack)
    try:
        for _ in range(operations):
            call = clients.gateways[gateway].StartAndStream(
                _start("ticker", steps=1, step_seconds=0.01)
            )
            async for update in call:
                if _is_terminal(update):
                    break
    finally:
        await clients.close()


async def start_latency(
    stack: Stack, trials: int, gateway: int = 0, floor: Floor | None = None
) -> dict[str, Any]:
    """The StartAndStream call -> the first `step_started` event received on the client's stream:
    what a start costs before any work begins (issue 14 removed the gateway's release delay).
    Two arms, their trials interleaved so that both see the same machine: the default held start
    (StartOperation held, the id to the client, ReleaseOperation, a separate WatchOperation) and
    `no_hold` (one StartAndWatchOperation stream carries the answer and the events). With
    `floor`, a floor (b) trial at 10 ms steps' pacing (start trials run back to back, as busy)
    is paired with each trial, first in odd trials and last in even ones, as stop_latency does."""
    clients = Clients(stack)
    first_step: dict[bool, list[float]] = {False: [], True: []}
    floor_push: list[float] = []
    rng = random.Random(1)

    async def floor_trial() -> None:
        if floor is not None:
            floor_push.append(await floor.push(0.01, rng.uniform(0, 0.005)))

    try:
        for trial in range(trials):
            if trial % 2:
                await floor_trial()
            for no_hold in (False, True) if trial % 2 else (True, False):
                request = _start("ticker", steps=1, step_seconds=0.01)
                request.no_hold = no_hold
                began = time.perf_counter()
                call = clients.gateways[gateway].StartAndStream(request)
                async for update in call:
                    if (
                        update.WhichOneof("update") == "event"
                        and update.event.WhichOneof("kind") == "step_started"
                    ):
                        first_step[no_hold].append((time.perf_counter() - began) * ms)
                    if _is_terminal(update):
                        break
            if trial % 2 == 0:
                await floor_trial()
    finally:
        await clients.close()
    out: dict[str, Any] = {
        "first_step_ms": summary(first_step[False]),
        "no_hold_first_step_ms": summary(first_step[True]),
        "trials": trials,
    }
    if floor is not None:
        out["floor"] = {
            "how": "interleaved: a floor (b) trial beside each",
            "push_ms": summary(floor_push),
        }
    return out


EARLY_STOP_DELAYS_MS = (0.0, 1.0, 5.0)


async def early_stop(
    stack: Stack, trials: int, delays_ms: tuple[float, ...] = EARLY_STOP_DELAYS_MS
) -> dict[str, Any]:
    """Stop BY KEY 0, 1 or 5 ms after the start call is made, before its answer: did any step
    start? With stops by key there is no window in which the client cannot stop (issue 14)."""
    clients = Clients(stack)
    by_delay: dict[str, dict[str, int]] = {}
    started = 0
    try:
        for delay in delays_ms:
            row = {"trials": trials, "operations_with_a_step_started": 0, "recorded_ahead": 0}
            for _ in range(trials):
                key = f"bench-early-{uuid.uuid4()}"
                request = _start("ticker", steps=2, step_seconds=1)
                request.idempotency_key = key
                call = clients.gateways[0].StartAndStream(request)
                if delay:
                    await asyncio.sleep(delay / ms)
                answer = await clients.gateways[0].StopOperation(
                    gw.StopOperationRequest(idempotency_key=key, reason="bench")
                )
                if answer.outcome == rt.INTERRUPT_OUTCOME_RECORDED_AHEAD:
                    row["recorded_ahead"] += 1
                async for update in call:
                    if (
                        update.WhichOneof("update") == "event"
                        and update.event.WhichOneof("kind") == "step_started"
                    ):
                        row["operations_with_a_step_started"] += 1
                    if _is_terminal(update):
                        break
                call.cancel()
            by_delay[f"{delay:g}ms"] = row
            started += row["operations_with_a_step_started"]
    finally:
        await clients.close()
    return {
        "trials": trials * len(delays_ms),
        "operations_with_a_step_started": started,
        "by_delay": by_delay,
    }


async def per_step_overhead(stack: Stack, steps: int = 1000, repeats: int = 3) -> dict[str, Any]:
    """Steps that do nothing: what a step costs (checkpoint and events included), measured from
    the runtime's own event times and from a client watching through the gateway."""
    clients = Clients(stack)
    runtime_ms: list[float] = []
    client_ms: list[float] = []
    try:
        for _ in range(repeats):
            with trial_span("per-step trial"):
                began = time.perf_counter()
                first_time = last_time = None
                async for update in clients.gateways[0].StartAndStream(_start("noop", steps=steps)):
                    if update.WhichOneof("update") != "event":
                        continue
                    event = update.event
                    if event.WhichOneof("kind") == "started":
                        first_time = event.time.ToDatetime()
                    if _is_terminal(update):
                        last_time = event.time.ToDatetime()
                        break
                client_ms.append((time.perf_counter() - began) * ms / steps)
                assert first_time is not None and last_time is not None
                runtime_ms.append((last_time - first_time).total_seconds() * ms / steps)
    finally:
        await clients.close()
    return {"runtime_ms_per_step": summary(runtime_ms), "client_ms_per_step": summary(client_ms)}
