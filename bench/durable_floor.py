"""How much of a stop's cost is the database's: Stopline against the floor and against a
*durable* floor, at the same moments of the VM (issue 17).

    python -m bench.durable_floor [--backends sqlite,postgresql] [--steps 0.01,1] [--trials 30]

The floor (bench/floor.py) is the stop's topology with no logic and no storage, and issue 17's
targets are ratios to it. But a stop that is acknowledged must survive a crash, and a terminal
event a client has seen must not change after one, so any design pays two durable writes on the
stop's path that the floor does not: the stop's before its acknowledgment, the halt's before
its terminal event. The durable floor is the same three processes with exactly those two writes
in the backend (bench/floor_store.py: Stopline's shapes on the same database and settings, and
nothing else). Per stack, each stop trial (scenarios.stop_latency, the table's same-connection
stop) is paired with one trial of each floor and kind at its pause, so the three are measured at
the same moments:

* Stopline ÷ floor: the table's ratio;
* durable floor ÷ floor: what the database alone costs over the floor, which no design that
  acknowledges durable stops can avoid;
* Stopline ÷ durable floor: what Stopline's own logic costs on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench import scenarios
from bench.floor import Floor
from bench.stack import ADMIN_URL, Stack, admin
from bench.stats import ratio_interval
from bench.table import DASH, TIMES


class BothFloors:
    """The floor protocol scenarios.Pairing drives (its trials are the plain floor's), with a
    durable floor trial of the same kind run beside each, kept here."""

    def __init__(self, plain: Floor, durable: Floor) -> None:
        self._plain = plain
        self._durable = durable
        self.durable_unary: list[float] = []
        self.durable_push: list[float] = []

    async def unary(self, step: float, pause: float) -> float:
        self.durable_unary.append(await self._durable.unary(step, pause))
        return await self._plain.unary(step, pause)

    async def push(self, step: float, pause: float) -> float:
        self.durable_push.append(await self._durable.push(step, pause))
        return await self._plain.push(step, pause)


class ScratchDatabase:
    """The durable floor's own database: a file beside the stack's, or a PostgreSQL database
    created for the run and dropped after it."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self._name: str | None = None
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'durable-floor.db'}"
            return
        self._name = f"stopline_floor_{uuid.uuid4().hex[:10]}"
        admin(f'CREATE DATABASE "{self._name}"')
        url = make_url(ADMIN_URL).set(drivername="postgresql", database=self._name)
        self.url = url.render_as_string(hide_password=False)

    def drop(self) -> None:
        if self._name is not None:
            admin(f'DROP DATABASE IF EXISTS "{self._name}" WITH (FORCE)')


async def measure_backend(backend: str, steps: list[float], trials: int) -> dict[str, Any]:
    """Each step length's stop trials on one stack, each paired with a trial of each floor
    and kind: the samples of all six figures."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, Stack(backend, Path(tmp)) as stack:
        workdir = Path(tmp)
        await scenarios.warm_up(stack, gateway=0)
        scratch = ScratchDatabase(backend, workdir)
        plain = durable = None
        try:
            plain = await Floor.open(stack, workdir)
            durable = await Floor.open(stack, workdir, database=scratch.url)
            for step in steps:
                both = BothFloors(plain, durable)
                result = await scenarios.stop_latency(stack, step, trials, floor=both)
                out[f"{step:g}s"] = {
                    "ack": {
                        "stopline": result["ack_ms"]["samples"],
                        "floor": result["floor"]["unary_ms"]["samples"],
                        "durable": both.durable_unary,
                    },
                    "halt": {
                        "stopline": result["halt_ms"]["samples"],
                        "floor": result["floor"]["push_ms"]["samples"],
                        "durable": both.durable_push,
                    },
                }
        finally:
            for opened in (plain, durable):
                if opened is not None:
                    await opened.close()
            scratch.drop()
    return out


def ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Medians and the three ratios of one figure, each with its 95 % paired interval."""
    median = {name: statistics.median(values) for name, values in samples.items()}
    out: dict[str, Any] = {f"{name}_ms": value for name, value in median.items()}
    for label, top, bottom in (
        ("stopline_over_floor", "stopline", "floor"),
        ("durable_over_floor", "durable", "floor"),
        ("stopline_over_durable", "stopline", "durable"),
    ):
        out[label] = median[top] / median[bottom]
        out[f"{label}_interval"] = ratio_interval(samples[top], samples[bottom])
    return out


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| backend | step | figure | Stopline | floor | durable floor | Stopline ÷ floor "
        "| durable ÷ floor | Stopline ÷ durable |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    names = {"ack": "acknowledgment", "halt": "stop → terminal event"}

    def cell(figure: dict[str, Any], label: str) -> str:
        interval = figure[f"{label}_interval"]
        shown = f"**{figure[label]:.2f}{TIMES}**"
        return shown if interval is None else f"{shown} ({interval[0]:.2f}{DASH}{interval[1]:.2f})"

    for backend, by_step in results.items():
        for step, figures in by_step.items():
            for kind, samples in figures.items():
                f = ratios(samples)
                lines.append(
                    f"| {backend} | {step} | {names[kind]} | {f['stopline_ms']:.2f} ms "
                    f"| {f['floor_ms']:.2f} ms | {f['durable_ms']:.2f} ms "
                    f"| {cell(f, 'stopline_over_floor')} | {cell(f, 'durable_over_floor')} "
                    f"| {cell(f, 'stopline_over_durable')} |"
                )
    return "\n".join(lines)


async def compare(backends: list[str], steps: list[float], trials: int) -> dict[str, Any]:
    return {backend: await measure_backend(backend, steps, trials) for backend in backends}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--steps", default="0.01,1", help="step lengths, seconds")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    steps = [float(step) for step in args.steps.split(",")]
    results = asyncio.run(compare(args.backends.split(","), steps, args.trials))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
