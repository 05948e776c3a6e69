"""One replica against two behind one gateway, at the same moments of the VM (issue 17).

    python -m bench.shapes --step-seconds 0.01 --trials 40

The table's two-replica rows come from stacks of their own, run minutes apart from the
single replica's, and this VM's speed drifts within minutes. Here both stacks (PostgreSQL) are up
at once, one replica with its gateway and two replicas named to one gateway over both (routed,
production's shape), and their stop trials alternate, same pause, which one goes first
alternating too; the medians are comparable as the table's rows are not. A third stack, one
replica named to its gateway, separates what routing itself costs (a routed stop travels over the
gateway's own connection to the replica, not the one its events stream on) from what a second
replica does.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.scenarios import Clients, _is_terminal, ticking, warm_up
from bench.stack import Stack
from stopline.gateway.v1 import gateway_service_pb2 as gw


async def stop_trial(gateway: Any, step: float, pause: float) -> tuple[float, float]:
    """(acknowledgment, stop -> terminal event), ms."""
    call, op_id = await ticking(gateway, step)
    await asyncio.sleep(pause)
    began = time.perf_counter()
    await gateway.StopOperation(gw.StopOperationRequest(operation_id=op_id, reason="shapes"))
    ack = (time.perf_counter() - began) * 1000
    async for update in call:
        if _is_terminal(update):
            break
    return ack, (time.perf_counter() - began) * 1000


async def compare(step: float, trials: int) -> dict[str, dict[str, float]]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        Stack("postgresql", Path(tmp)) as one,
        Stack("postgresql", Path(tmp), advertise=True, balanced=True) as named,
        Stack("postgresql", Path(tmp), replicas=2, advertise=True, balanced=True) as two,
    ):
        await warm_up(named, gateway=-1)
        await warm_up(two, gateway=-1)
        shapes = {
            "one replica": Clients(one),
            "one replica, routed": Clients(named),
            "two replicas, routed": Clients(two),
        }
        gateways = {"one replica": 0, "one replica, routed": -1, "two replicas, routed": -1}
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in shapes}
        rng = random.Random(1)
        try:
            for _ in range(trials):
                pause = rng.uniform(0, min(step, 1.0) * 0.5)
                order = list(shapes)
                rng.shuffle(order)  # which goes first, second and last varies
                for name in order:
                    gateway = shapes[name].gateways[gateways[name]]
                    samples[name].append(await stop_trial(gateway, step, pause))
        finally:
            for clients in shapes.values():
                await clients.close()
    return {
        name: {
            "ack_ms": statistics.median(a for a, _ in values),
            "halt_ms": statistics.median(h for _, h in values),
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    result = asyncio.run(compare(args.step_seconds, args.trials))
    for name, medians in result.items():
        print(
            f"{name:22s} acknowledgment {medians['ack_ms']:6.2f} ms   "
            f"stop -> terminal event {medians['halt_ms']:6.2f} ms"
        )


if __name__ == "__main__":
    main()
