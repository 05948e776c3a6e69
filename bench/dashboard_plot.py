"""The Grafana dashboard (deploy/grafana/stopline.json) drawn from a benchmark run: a runtime and a
gateway (separate processes, metrics on), a real Prometheus scraping them every second, and a
load of start-and-stop operations through the gateway. Each panel's queries are then asked of
Prometheus over the run (/api/v1/query_range) and drawn with matplotlib, since Grafana itself is
not available offline. Needs the `bench` extra and Debian's `prometheus` package.

    python -m bench.dashboard_plot [--seconds 45] [--clients 16] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.credentials import TOKEN, gateway_channel
from tests.processes import GatewayProcess, RuntimeProcess, free_port
from tests.prometheus import PrometheusServer
from tests.test_gateway import start_request

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "stopline.json"
SCRAPE = "1s"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape, rounded up
COMPLETE_SHARE = 0.3  # operations left to complete; the others are stopped mid-step


def ticker_input(rng: random.Random) -> dict[str, Any]:
    return {"steps": 4, "step_seconds": rng.uniform(0.1, 0.4), "chunk_interval_seconds": 0.05}


async def client(address: str, until: float, seed: int, done: list[str]) -> None:
    """Start-and-stream operations in a loop; stop most of them mid-step after a short while."""
    rng = random.Random(seed)
    async with gateway_channel(address, TOKEN) as channel:
        stub: Any = pb_grpc.GatewayServiceStub(channel)
        while time.monotonic() < until:
            call = stub.StartAndStream(start_request("ticker", ticker_input(rng)))
            stop_after = None if rng.random() < COMPLETE_SHARE else rng.uniform(0.05, 0.5)
            op_id = ""
            stop_task: asyncio.Task[Any] | None = None
            async for update in call:
                which = update.WhichOneof("update")
                if which == "accepted":
                    op_id = update.accepted.operation_id
                    if stop_after is not None:

                        async def stop(op: str, delay: float) -> None:
                            await asyncio.sleep(delay)
                            await stub.StopOperation(pb.StopOperationRequest(operation_id=op))

                        stop_task = asyncio.create_task(stop(op_id, stop_after))
                elif which == "event" and update.event.WhichOneof("kind") in (
                    "completed",
                    "failed",
                    "interrupted",
                ):
                    done.append(update.event.WhichOneof("kind"))
            if stop_task is not None:
                # The operation may have ended before the stop: FAILED_PRECONDITION.
                with contextlib.suppress(grpc.RpcError):
                    await stop_task


def panels() -> list[dict[str, Any]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    found: list[dict[str, Any]] = dashboard["panels"]
    return found


def legend(template: str, metric: dict[str, str]) -> str:
    text = template
    for key, value in metric.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def draw(prometheus: PrometheusServer, start: float, end: float, out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels()
    columns = 4
    rows = (len(shown) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.3 * rows))
    for ax, panel in zip(axes.flat, shown, strict=False):
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        scale = 1000.0 if unit == "s" else 1.0
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for series in prometheus.query_range(expr, start, end, 1.0):
                points = [
                    (float(t) - start, float(v) * scale)
                    for t, v in series["values"]
                    if v not in ("NaN", "+Inf", "-Inf")
                ]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, linewidth=1, label=legend(target["legendFormat"], series["metric"]))
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(
            {"s": "ms", "ops": "per second", "reqps": "calls/s"}.get(unit, ""), fontsize=8
        )
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds into the run", fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    figure.suptitle(f"Stopline dashboard (deploy/grafana/stopline.json) — {subtitle}", fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)


async def load(address: str, seconds: float, clients: int) -> list[str]:
    done: list[str] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(address, until, seed, done) for seed in range(clients)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stopline-dashboard-") as tmp:
        workdir = Path(tmp)
        url = f"sqlite:///{workdir / 'runtime.db'}"
        runtime_metrics, gateway_metrics = free_port(), free_port()
        runtime = RuntimeProcess(
            url, workdir, extra_args=("--metrics-address", f"127.0.0.1:{runtime_metrics}")
        )
        gateway = GatewayProcess(
            runtime.address,
            workdir,
            extra_args=("--metrics-address", f"127.0.0.1:{gateway_metrics}"),
        )
        jobs = {
            "stopline-runtime": [f"127.0.0.1:{runtime_metrics}"],
            "stopline-gateway": [f"127.0.0.1:{gateway_metrics}"],
        }
        try:
            with PrometheusServer(workdir / "prometheus", jobs, SCRAPE) as prometheus:
                deadline = time.monotonic() + 30
                while prometheus.targets_up() < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("Prometheus never scraped both services")
                    time.sleep(0.2)
                start = time.time()
                done = asyncio.run(load(gateway.address, args.seconds, args.clients))
                time.sleep(3)  # two more scrapes, so the run's last seconds are in
                end = time.time()
                ended = ", ".join(f"{done.count(kind)} {kind}" for kind in sorted(set(done)))
                subtitle = (
                    f"{args.clients} clients starting and stopping ticker operations for "
                    f"{args.seconds:g} s (SQLite, one runtime, one gateway): {ended}"
                )
                print(subtitle)
                draw(prometheus, start, end, args.out, subtitle)
                print(f"wrote {args.out}")
        finally:
            gateway.close()
            runtime.close()


if __name__ == "__main__":
    main()
