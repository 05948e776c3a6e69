"""What the servers' interceptor chains cost per call: one grpc.aio server per chain in this
process, each answering a unary call with nothing, and one client per server; rounds alternate
between the chains, and each chain's figure is the median of its rounds' medians, with its
difference from the server with no interceptor measured in the same run.

    python -m bench.interceptors [--rounds 12] [--calls 300]

Chains: the services' off configuration (authentication and the malformed-request guard), then
with the metrics interceptor, then with tracing too (an SDK provider whose spans are batched and
dropped, as `tracing.install` sets up): the per-call parts of issue 16's "on" arm.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry

from stopline import tracing
from stopline.authn import AuthInterceptor
from stopline.grpc_status import MalformedRequestGuard
from stopline.metrics import GrpcMetrics

METHOD = "/bench.Echo/Call"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
Chain = Callable[[], list[Any]]


async def _nothing(request: bytes, context: Any) -> bytes:
    return b""


def _auth() -> AuthInterceptor:
    return AuthInterceptor(lambda metadata: "bench", "bench")


def _metrics() -> Any:
    return GrpcMetrics(CollectorRegistry(), "bench", frozenset({METHOD})).interceptor()


CHAINS: dict[str, Chain] = {
    "none": lambda: [],
    "auth + guard (off)": lambda: [_auth(), MalformedRequestGuard()],
    "metrics + auth + guard": lambda: [_metrics(), _auth(), MalformedRequestGuard()],
    "tracing + metrics + auth + guard (on)": lambda: [
        *tracing.server_interceptors(),
        _metrics(),
        _auth(),
        MalformedRequestGuard(),
    ],
}


async def measure(rounds: int, calls: int) -> dict[str, list[float]]:
    tracing.install()
    servers: list[aio.Server] = []
    callers: dict[str, Any] = {}
    channels: list[aio.Channel] = []
    try:
        for name, chain in CHAINS.items():
            server = aio.server(interceptors=chain() or None)
            handler = grpc.unary_unary_rpc_method_handler(_nothing)
            generic = grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler})
            server.add_generic_rpc_handlers((generic,))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            channel = aio.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            callers[name] = channel.unary_unary(METHOD, None, None)
            await callers[name](b"")
        medians: dict[str, list[float]] = {name: [] for name in CHAINS}
        # A sampled caller's trace context, as the stop path's calls carry with tracing on.
        metadata = (("authorization", "Bearer bench"), ("traceparent", TRACEPARENT))
        for _ in range(rounds):
            for name, call in callers.items():
                samples = []
                for _ in range(calls):
                    began = time.perf_counter()
                    await call(b"", metadata=metadata)
                    samples.append((time.perf_counter() - began) * 1e6)
                medians[name].append(statistics.median(samples))
        return medians
    finally:
        for channel in channels:
            await channel.close(grace=None)
        for server in servers:
            await server.stop(grace=None)
        tracing.uninstall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    medians = asyncio.run(measure(args.rounds, args.calls))
    base = statistics.median(medians["none"])
    for name, values in medians.items():
        figure = statistics.median(values)
        print(f"{name:40s} {figure:7.1f} µs per call   +{figure - base:6.1f} µs")


if __name__ == "__main__":
    main()
