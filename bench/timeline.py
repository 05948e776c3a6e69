"""Where a stop's acknowledgment, or a start's first step, spends its time: a timeline from the
services' own spans (tracing on, exported to a sink in this process), beside the client's clock.

    python -m bench.timeline stop --backend sqlite --trials 30      # one stop's hops
    python -m bench.timeline start --backend sqlite --trials 25     # a held start
    python -m bench.timeline start --no-hold                        # a start with no hold
    python -m bench.timeline stop --backend postgresql --balanced --routed --step-seconds 0.01
                    # production's shape: one gateway over two replicas (named to it or not)

Every process runs on this host, so span times (wall clock, ns) and the client's `time.time_ns()`
share a clock. A stop: client send → the gateway's `StopOperation` span → its `stop delivery`
span → the runtime's `InterruptOperation` span, and back; each one-way trip includes, beyond the
wire, gRPC's dispatch of the call up to the span's start (or from its end). A start: the
gateway's `StartAndStream` span, the runtime's start and release spans, the first `step` span,
and the client's receipt of the `accepted` message and of the first `step_started` event.
Tracing costs a little on every hop, so read the parts against each other, not against the
other benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

from bench.otlp_sink import service_of
from bench.scenarios import Clients, _is_terminal, _start, ticking, warm_up
from bench.stack import Stack
from stopline.gateway.v1 import gateway_service_pb2 as gw

RUNTIME, GATEWAY = "stopline-runtime", "stopline-gateway"
RT = "stopline.v1.RuntimeService/"
GW = "stopline.gateway.v1.GatewayService/"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    start: int
    end: int
    attributes: dict[str, Any]
    pid: int = 0  # the exporting process (several runtime replicas share a service name)


class Sink(ts_grpc.TraceServiceServicer):
    """Keeps every exported span."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Span] = []

    def Export(
        self, request: ts.ExportTraceServiceRequest, context: Any
    ) -> ts.ExportTraceServiceResponse:
        with self.lock:
            for resource in request.resource_spans:
                service = service_of(resource)
                pid = next(
                    (
                        a.value.int_value
                        for a in resource.resource.attributes
                        if a.key == "process.pid"
                    ),
                    0,
                )
                for scope in resource.scope_spans:
                    for s in scope.spans:
                        attributes = {
                            a.key: a.value.string_value or a.value.int_value for a in s.attributes
                        }
                        self.spans.append(
                            Span(
                                service,
                                s.name,
                                s.start_time_unix_nano,
                                s.end_time_unix_nano,
                                attributes,
                                pid,
                            )
                        )
        return ts.ExportTraceServiceResponse()

    def find(
        self,
        service: str,
        name: str,
        began: int,
        ended: int,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> Span | None:
        """The first span of that name begun between `began` and `ended`."""
        with self.lock:
            for span in self.spans:
                if (
                    span.service == service
                    and span.name == name
                    and began <= span.start <= ended
                    and where(span.attributes)
                ):
                    return span
        return None


Trial = tuple[str, int, int, int]  # operation id and three client clock readings (ns)


async def stop_trials(
    stack: Stack, trials: int, step_seconds: float, gateway: int = 0
) -> list[Trial]:
    """Stops paced as bench.scenarios.stop_latency: (id, sent, acknowledged, terminal)."""
    rng = random.Random(1)
    clients = Clients(stack)
    out: list[Trial] = []
    try:
        if gateway != 0:
            await warm_up(stack, gateway)
        for _ in range(trials):
            call, op_id = await ticking(clients.gateways[gateway], step_seconds)
            await asyncio.sleep(rng.uniform(0, min(step_seconds, 1.0) * 0.5))
            sent = time.time_ns()
            await clients.gateways[gateway].StopOperation(
                gw.StopOperationRequest(operation_id=op_id, reason="timeline")
            )
            acknowledged = time.time_ns()
            async for update in call:
                if _is_terminal(update):
                    break
            out.append((op_id, sent, acknowledged, time.time_ns()))
    finally:
        await clients.close()
    return out


async def start_trials(stack: Stack, trials: int, no_hold: bool) -> list[Trial]:
    """Starts of a 10 ms `ticker`: (id, sent, accepted received, first step_started received)."""
    clients = Clients(stack)
    out: list[Trial] = []
    try:
        for trial in range(trials + 3):  # the first three warm the stack up
            await asyncio.sleep(0.2)
            request = _start("ticker", steps=2, step_seconds=0.01, chunk_interval_seconds=0.005)
            request.no_hold = no_hold
            sent = time.time_ns()
            accepted, op_id = 0, ""
            call = clients.gateways[0].StartAndStream(request)
            async for update in call:
                if update.WhichOneof("update") == "accepted":
                    accepted, op_id = time.time_ns(), update.accepted.operation_id
                if (
                    update.WhichOneof("update") == "event"
                    and update.event.WhichOneof("kind") == "step_started"
                ):
                    break
            first = time.time_ns()
            call.cancel()
            if trial >= 3:
                out.append((op_id, sent, accepted, first))
    finally:
        await clients.close()
    return out


def _add(parts: dict[str, list[float]], name: str, ns: int) -> None:
    parts.setdefault(name, []).append(ns / 1e6)


def stop_parts(sink: Sink, trials: list[Trial]) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {}
    add = partial(_add, parts)
    for op_id, sent, acknowledged, terminal in trials:
        handler = sink.find(GATEWAY, GW + "StopOperation", sent, acknowledged)
        delivery = sink.find(GATEWAY, "stop delivery", sent, acknowledged)
        interrupt = sink.find(RUNTIME, RT + "InterruptOperation", sent, acknowledged)
        if handler is None or delivery is None or interrupt is None:
            continue
        add("acknowledgment (client)", acknowledged - sent)
        add("client -> gateway handler", handler.start - sent)
        add("gateway, before the runtime call", delivery.start - handler.start)
        add("gateway -> runtime handler", interrupt.start - delivery.start)
        add("runtime handler", interrupt.end - interrupt.start)
        add("runtime -> gateway", delivery.end - interrupt.end)
        add("gateway, after the runtime's answer", handler.end - delivery.end)
        add("gateway -> client", acknowledged - handler.end)
        add("terminal event after the acknowledgment", terminal - acknowledged)
        step = sink.find(RUNTIME, "step", 0, terminal, partial(_of_operation, op_id))
        if step is not None and step.pid and interrupt.pid:
            # Which replica recorded the stop (n: how many trials did there).
            where = "the runner's replica" if step.pid == interrupt.pid else "another replica"
            add(f"acknowledgment, stop recorded on {where}", acknowledged - sent)
            add(f"terminal event, stop recorded on {where}", terminal - sent)
    return parts


def _of_operation(op_id: str, attributes: dict[str, Any]) -> bool:
    return bool(attributes.get("stopline.operation_id") == op_id)


def start_parts(sink: Sink, trials: list[Trial]) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {}
    add = partial(_add, parts)
    for op_id, sent, accepted, first in trials:
        add("first step_started received (client)", first - sent)
        add("accepted received (client)", accepted - sent)
        marks = {
            "gateway StartAndStream begins": sink.find(GATEWAY, GW + "StartAndStream", sent, first),
            "runtime start begins": sink.find(RUNTIME, RT + "StartAndWatchOperation", sent, first)
            or sink.find(RUNTIME, RT + "StartOperation", sent, first),
            "runtime release begins": sink.find(RUNTIME, RT + "ReleaseOperation", sent, first),
            "first step span begins": sink.find(
                RUNTIME, "step", sent, first, lambda a, op=op_id: a["stopline.operation_id"] == op
            ),
        }
        for name, span in marks.items():
            if span is not None:
                add(name, span.start - sent)
        release = marks["runtime release begins"]
        if release is not None:
            add("runtime release ends", release.end - sent)
    return parts


async def main_async(args: argparse.Namespace) -> None:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        # process.pid on every span's resource: which replica recorded what.
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel,process",
    }
    shape: dict[str, Any] = {}
    if args.balanced:
        shape = {"replicas": 2, "balanced": True, "advertise": args.routed}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(args.backend, Path(tmp), env=env, **shape)
            gateway = -1 if args.balanced else 0
            try:
                if args.what == "stop":
                    trials = await stop_trials(stack, args.trials, args.step_seconds, gateway)
                else:
                    trials = await start_trials(stack, args.trials, args.no_hold)
            finally:
                stack.close()  # the services export what they hold as they exit
        parts = (stop_parts if args.what == "stop" else start_parts)(sink, trials)
    finally:
        server.stop(None)
    print(f"{args.what} on {args.backend}: {len(trials)} trials; medians (ms, from the send)")
    for name, values in parts.items():
        print(f"  {name:42s} {statistics.median(values):7.3f}   (n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("stop", "start"))
    parser.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"))
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--step-seconds", type=float, default=1.0, help="stop: the step length")
    parser.add_argument("--no-hold", action="store_true", help="start: with no hold")
    parser.add_argument(
        "--balanced",
        action="store_true",
        help="stop: two replicas behind one gateway (round_robin), as bench.run's cross",
    )
    parser.add_argument(
        "--routed", action="store_true", help="with --balanced: the replicas named to it"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
