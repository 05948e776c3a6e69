"""Run every benchmark scenario, print a table, write raw JSON and PNG plots.

    python -m bench.run            # the full suite (about 10 minutes on 2 cores)
    python -m bench.run --quick    # fewer trials, for a smoke run
    python -m bench.run --no-peers # Stopline only

Results go to bench/results/ (latest.json, plots/*.png); BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    agent_scenarios,
    floor,
    load_scenarios,
    node_client,
    scenarios,
    waiting_scenarios,
)
from bench.machine import RESULTS, machine
from bench.raw_server import save
from bench.stack import Stack
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from tests.credentials import gateway_channel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def streaming(stack: Stack, workdir: Path, quick: bool) -> dict[str, Any]:
    op_id, last = await load_scenarios.prepare_events(stack, steps=200 if quick else 500)
    # Record the gateway's messages for the raw baseline, so message sizes are identical.
    async with gateway_channel(stack.gateways[0].address) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        messages = [
            m async for m in stub.StreamOperation(gw.StreamOperationRequest(operation_id=op_id))
        ]
    path = workdir / "messages.bin"
    save(path, messages)
    port = free_port()
    raw = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.raw_server", str(port), str(path), stdout=subprocess.PIPE
    )
    try:
        assert raw.stdout is not None and (await raw.stdout.readline()).strip() == b"ready"
        result: dict[str, Any] = {"events_per_operation": last}
        for streams in (1, 50):
            gateway = await load_scenarios.stream_rate(stack.gateways[0].address, op_id, streams)
            baseline = await load_scenarios.stream_rate(f"127.0.0.1:{port}", op_id, streams)
            result[f"{streams}_streams"] = {
                "gateway": gateway,
                "raw_baseline": baseline,
                "ratio": gateway["events_per_second"] / baseline["events_per_second"],
            }
        return result
    finally:
        raw.terminate()
        await raw.wait()


SCENARIOS: tuple[str, ...] = (
    "floor",
    "stop",
    "stop_second_client",
    "stop_node",
    "start_latency",
    "early_stop",
    "per_step",
    "streaming",
    "concurrency",
    "baseline",
    "cross",
)
SCENARIOS += ("capacity", "waiting", "observability")
AGENT_SCENARIOS = agent_scenarios.SCENARIOS
SCENARIOS += AGENT_SCENARIOS


async def _stops(
    stack: Stack,
    out: dict[str, Any],
    only: frozenset[str],
    trials: dict[float, int],
    quick: bool,
    paired: floor.Floor | None,
) -> None:
    """The stop scenarios on one replica, and the start scenario."""
    if "stop" in only:
        for step, n in trials.items():
            out[f"stop_latency/{step:g}s"] = await scenarios.stop_latency(
                stack, step, n, floor=paired
            )
    if "stop_second_client" in only:
        # The stop from another client on its own connection (another service, another tab).
        for step, n in trials.items():
            out[f"stop_own_connection/{step:g}s"] = await scenarios.stop_latency(
                stack, step, n, own_connection=True, floor=paired
            )
    if "stop_node" in only:
        node = await node_client.stop_latency(stack, trials, floor=paired)
        out.update({f"stop_node/{step}": data for step, data in node.items()})
    if "start_latency" in only:
        # Compared in the same run with stop-to-halt at 1 s steps (issue 14: <= 1.2x).
        start = await scenarios.start_latency(stack, 10 if quick else 50, floor=paired)
        stop = await scenarios.stop_latency(stack, 1.0, 5 if quick else 30)
        start["stop_halt_1s_ms"] = stop["halt_ms"]
        halt = stop["halt_ms"]["median"]
        start["ratio_to_stop_halt"] = start["first_step_ms"]["median"] / halt
        start["no_hold_ratio_to_stop_halt"] = start["no_hold_first_step_ms"]["median"] / halt
        out["start_latency"] = start


async def _cross(
    backend: str,
    workdir: Path,
    out: dict[str, Any],
    trials: dict[float, int],
    quick: bool,
    paired: floor.Floor | None,
) -> None:
    """PostgreSQL's stops across replicas: sent to the other replica, and through one gateway
    over both."""
    with Stack(backend, workdir, replicas=2) as stack:
        for step, n in trials.items():
            out[f"cross_replica_stop/{step:g}s"] = await scenarios.stop_latency(
                stack, step, n, cross_replica=True, floor=paired
            )
    # Production's shape: one gateway over both replicas (round_robin) that starts and stops
    # every operation, the replicas named to it (it then routes each operation's release and
    # stops to the replica streaming it) or not; the arms alternate, a stack each.
    for i, (step, n) in enumerate(trials.items()):
        for routed in (False, True) if i % 2 else (True, False):
            with Stack(backend, workdir, replicas=2, advertise=routed, balanced=True) as stack:
                await scenarios.warm_up(stack, gateway=-1)
                name = "balanced_routed" if routed else "balanced"
                out[f"{name}_stop/{step:g}s"] = await scenarios.stop_latency(
                    stack, step, n, gateway=-1, floor=paired
                )
                if i == 0:
                    out[f"{name}_start"] = await scenarios.start_latency(
                        stack, 10 if quick else 50, gateway=-1, floor=paired
                    )


async def stopline_suite(
    backend: str, workdir: Path, quick: bool, only: frozenset[str] = frozenset(SCENARIOS)
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    trials = {0.01: 10 if quick else 50, 1.0: 5 if quick else 30, 30.0: 3 if quick else 15}
    base_trials = {0.01: 5 if quick else 30, 1.0: 3 if quick else 10, 30.0: 1 if quick else 2}
    # The floor's processes stay up through every stack of the stop scenarios, each trial of
    # which is paired with floor trials (scenarios.stop_latency's `floor`).
    paired: floor.Floor | None = None
    try:
        with Stack(backend, workdir) as stack:
            if "floor" in only:
                paired = await floor.Floor.open(stack, workdir)
                # Raw gRPC, same topology, same pacing, in a block right before the stops (and
                # again right after them, below): the floor of the figures with no paired one.
                out["floor_before"] = await floor.floor(stack, workdir, trials, paired)
                out["floor"] = out["floor_before"]
            await _stops(stack, out, only, trials, quick, paired)
            if "floor" in only and only & {
                "stop",
                "stop_second_client",
                "stop_node",
                "start_latency",
            }:
                # The same floor again, after the figures it divides; the table divides by both
                # together (floor.pooled), so one fast or slow moment of the VM weighs half.
                out["floor_after"] = await floor.floor(stack, workdir, trials, paired)
                out["floor"] = floor.pooled(out["floor_before"], out["floor_after"])
            if "early_stop" in only:
                out["early_stop"] = await scenarios.early_stop(stack, 10 if quick else 50)
            if "per_step" in only:
                out["per_step"] = await scenarios.per_step_overhead(
                    stack, repeats=2 if quick else 3
                )
            if "streaming" in only:
                out["streaming"] = await streaming(stack, workdir, quick)
            if "concurrency" in only:
                out["concurrency"] = await load_scenarios.concurrency_repeated(
                    stack, 1 if quick else 3
                )
        if "baseline" in only:
            with Stack(backend, workdir, abort_mid_step=False) as stack:
                for step, n in base_trials.items():
                    out[f"baseline_boundary_only/{step:g}s"] = await scenarios.stop_latency(
                        stack, step, n
                    )
        if backend == "postgresql" and "cross" in only:
            await _cross(backend, workdir, out, trials, quick, paired)
    finally:
        if paired is not None:
            await paired.close()
    if "capacity" in only:
        with Stack(backend, workdir) as stack:
            out["capacity"] = await load_scenarios.capacity(stack, 500 if quick else 2000)
    if "waiting" in only:
        with Stack(backend, workdir, runtime_args=waiting_scenarios.RUNTIME_ARGS) as stack:
            out["waiting"] = await waiting_scenarios.waiting_capacity(
                stack, 1000 if quick else 10_000
            )
    if "observability" in only:
        # Issue 16: metrics, tracing and JSON logs on against off, stacks of their own.
        from bench import overhead

        if quick:
            out["observability"] = await overhead.observability(
                backend, workdir, rounds=2, stop_trials=3, steps=200, repeats=1
            )
        else:
            out["observability"] = await overhead.observability(backend, workdir)
    if only & set(AGENT_SCENARIOS):
        profiles = None if quick else RESULTS / "profiles"
        out.update(await agent_scenarios.suite(backend, workdir, quick, only, profiles))
    return out


def run_peer(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # a peer that cannot run here is reported, not hidden
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def peers(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from bench.peers import dbos_peer

        out["dbos"] = run_peer("dbos", lambda: dbos_peer.run_all(quick))
    except ImportError as exc:
        out["dbos"] = {"error": f"not installed: {exc} (pip install -e '.[bench]')"}
    try:
        from bench.peers import langgraph_peer

        out["langgraph"] = run_peer("langgraph", lambda: langgraph_peer.run_all(quick))
    except ImportError as exc:
        out["langgraph"] = {"error": f"not installed: {exc} (pip install -e '.[bench]')"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (while working on one figure)",
    )
    args = parser.parse_args()
    only = frozenset(args.only.split(","))
    if unknown := only - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "stopline": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            print(f"== stopline on {backend}", flush=True)
            results["stopline"][backend] = asyncio.run(
                stopline_suite(backend, Path(tmp), args.quick, only)
            )
    if not args.no_peers:
        print("== peers", flush=True)
        results["peers"] = peers(args.quick)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    from bench.report import plots, table
    from bench.table import markdown

    print(table(results))
    plots(results, RESULTS / "plots")
    (RESULTS / "table.md").write_text(markdown(results, "bench/results/latest.json") + "\n")
    print(
        f"\nraw results: {RESULTS / 'latest.json'}; plots: {RESULTS / 'plots'}; "
        f"ratios to the floor and the peers (Markdown): {RESULTS / 'table.md'}"
    )


if __name__ == "__main__":
    main()
