"""What one call costs when the processes have been idle, as a stop during a long step meets
them: a bare GetOperation straight to the runtime and through the gateway, and the stop itself
(InterruptOperation straight to the runtime, StopOperation through the gateway), each after a
random pause of 50-200 ms, on a running `ticker` operation with 1-second steps whose client is
streaming. This is the probe behind BENCHMARKS.md's note on the acknowledgment target.

    python -m bench.idle_rpc [--backend sqlite|postgresql] [--trials 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.scenarios import Clients, _start
from bench.stack import Stack
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.v1 import runtime_service_pb2 as rt
from tests.credentials import ENV

TERMINAL = ("interrupted", "completed")


async def _timed(
    samples: list[float], method: Callable[[Any], Awaitable[Any]], request: Any
) -> None:
    began = time.perf_counter()
    await method(request)
    samples.append((time.perf_counter() - began) * 1000.0)


async def measure(backend: str, trials: int, workdir: Path) -> dict[str, list[float]]:
    rng = random.Random(1)
    samples: dict[str, list[float]] = {
        "get, runtime": [],
        "get, gateway": [],
        "stop, runtime (InterruptOperation)": [],
        "stop, gateway (StopOperation)": [],
    }
    with Stack(backend, workdir) as stack:
        clients = Clients(stack)
        gateway, runtime = clients.gateways[0], clients.runtimes[0]
        try:
            for i in range(trials):
                call = gateway.StartAndStream(
                    _start("ticker", steps=2, step_seconds=1.0, chunk_interval_seconds=0.25)
                )
                op_id = ""
                async for update in call:
                    if update.WhichOneof("update") == "accepted":
                        op_id = update.accepted.operation_id
                    elif update.event.WhichOneof("kind") == "output_chunk":
                        break
                get_rt = rt.GetOperationRequest(operation_id=op_id)
                get_gw = gw.GetOperationRequest(operation_id=op_id)
                await asyncio.sleep(rng.uniform(0.05, 0.2))
                await _timed(samples["get, runtime"], runtime.GetOperation, get_rt)
                await asyncio.sleep(rng.uniform(0.05, 0.2))
                await _timed(samples["get, gateway"], gateway.GetOperation, get_gw)
                await asyncio.sleep(rng.uniform(0.05, 0.2))
                if i % 2:
                    await _timed(
                        samples["stop, runtime (InterruptOperation)"],
                        runtime.InterruptOperation,
                        rt.InterruptOperationRequest(operation_id=op_id),
                    )
                else:
                    await _timed(
                        samples["stop, gateway (StopOperation)"],
                        gateway.StopOperation,
                        gw.StopOperationRequest(operation_id=op_id),
                    )
                async for update in call:
                    if update.event.WhichOneof("kind") in TERMINAL:
                        break
        finally:
            await clients.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"))
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory() as tmp:
        samples = asyncio.run(measure(args.backend, args.trials, Path(tmp)))
    for name, values in samples.items():
        print(
            f"{name:<40} median {statistics.median(values):5.2f} ms   "
            f"min {min(values):5.2f}   n={len(values)}"
        )


if __name__ == "__main__":
    main()
