"""The published table (issue 17): every latency figure of one run as a ratio to the floor and to
each peer measured in the same run, as Markdown for the top of BENCHMARKS.md.

    python -m bench.table bench/results/latest.json > table.md

The VM's speed moves by 2x between days; the ratio to what the machine can do at all (the floor,
bench/floor.py) stays put. A stop scenario's floor is measured by trials paired with its own
(scenarios.stop_latency's `floor`: the VM's speed drifts within minutes too); the other figures'
floor, right before and right after them, both pooled. Each Stopline figure is set against the
floor that bounds it:

* a stop's acknowledgment (the StopOperation call's return) against floor (a), one unary call
  relayed client -> relay -> backend and back;
* stop -> terminal event at the client, and start -> first step event, against floor (b), that
  call plus an event pushed back from the backend through the relay's stream;

each at the same pacing (the step length decides how idle the processes are when the call comes).
The peers are run once per run, so both backends are divided by the same peer figure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import ratio_interval

ACK, HALT = "unary_ms", "push_ms"
"""The floor figure each kind of Stopline figure is divided by: (a) and (b)."""

# Stopline stop scenarios: result-name prefix -> how the table names them.
STOPS = (
    ("stop_latency", "stop, same connection"),
    ("stop_own_connection", "stop from a second connection"),
    ("stop_node", "stop from a Node grpc-js client"),
    ("cross_replica_stop", "stop sent to the other replica"),
    ("balanced_stop", "two replicas behind one gateway, not named"),
    ("balanced_routed_stop", "two replicas behind one gateway, named (routed)"),
    ("ticker_stop", "stop (agent-scenario stack)"),
    ("baseline_boundary_only", "boundary-only baseline (no mid-step abort)"),
)
# Start scenarios: result name -> what the table adds to the figure's name.
START_SCENARIOS = (
    ("start_latency", ""),
    ("balanced_start", ", two replicas behind one gateway, not named"),
    ("balanced_routed_start", ", two replicas behind one gateway, named (routed)"),
)
TIMES = "\u00d7"
"""The multiplication sign of the ratios (Markdown renders it; ruff rightly flags it in code)."""
DASH = "\u2013"
"""The en dash of the intervals (as TIMES: Markdown's, not code's)."""
STEP_NAMES = {"0.01s": "10 ms", "1s": "1 s", "30s": "30 s"}
# Issue 17's targets, as a bound on the ratio to the floor (backend None: either).
TARGETS = {
    ("stop_latency", ACK, None): "≤ 1.5",
    ("stop_latency", HALT, "sqlite"): "≤ 1.5",
    ("cross_replica_stop", HALT, "postgresql"): "≤ 2",
    ("balanced_stop", HALT, "postgresql"): "≤ 2",
    ("balanced_routed_stop", HALT, "postgresql"): "≤ 2",
    ("start_latency", HALT, None): "≤ 2",
}


def target(prefix: str, kind: str, backend: str) -> str:
    return TARGETS.get((prefix, kind, backend)) or TARGETS.get((prefix, kind, None), "")


@dataclass
class Row:
    backend: str
    figure: str
    step: str
    ours: float | None
    floor: float | None = None
    target: str = ""
    langgraph: float | None = None
    dbos: float | None = None
    unit: str = "ms"
    # The trials behind `ours` and `floor`, for the ratio's interval (stats.ratio_interval).
    ours_samples: list[float] | None = None
    floor_samples: list[float] | None = None


def _samples(summary: Any) -> list[float] | None:
    samples = summary.get("samples") if isinstance(summary, dict) else None
    return list(samples) if samples else None


def _median(summary: Any) -> float | None:
    if not isinstance(summary, dict):
        return None
    value = summary.get("median")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _langgraph(peers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    data = peers.get("langgraph") or {}
    runs = data.get("cancel_while_streaming") or []
    return {f"{run['step_seconds']:g}s": run for run in runs if "step_seconds" in run}


def _dbos(peers: dict[str, Any], step: str) -> dict[str, Any]:
    cancel = (peers.get("dbos") or {}).get("cancel_to_halt") or {}
    variants = (cancel.get(step) or {}).get("variants") or {}
    summary: dict[str, Any] = (variants.get("boundary") or {}).get("summary") or {}
    return summary


def rows(results: dict[str, Any]) -> Iterator[Row]:
    peers = results.get("peers") or {}
    langgraph = _langgraph(peers)
    for backend, suite in results.get("stopline", {}).items():
        floor = suite.get("floor") or {}
        for prefix, label in STOPS:
            for name in sorted((n for n in suite if n.startswith(prefix + "/")), key=_step_key):
                step = name.split("/", 1)[1]
                data = suite[name]
                # The floor trials paired with these stops, else the run's floor measured in
                # blocks before and after them.
                pace = data.get("floor") or floor.get(step) or {}
                lg = langgraph.get(step) or {}
                db = _dbos(peers, step)
                for key, kind, lg_key, what in (
                    ("ack_ms", ACK, "cancel_return_ms", "acknowledgment"),
                    ("halt_ms", HALT, "stream_end_ms", "stop → terminal event"),
                ):
                    yield Row(
                        backend,
                        f"{label}: {what}",
                        STEP_NAMES.get(step, step),
                        _median(data.get(key)),
                        _median(pace.get(kind)),
                        target(prefix, kind, backend),
                        _median(lg.get(lg_key)),
                        _median(db.get(key)),
                        ours_samples=_samples(data.get(key)),
                        floor_samples=_samples(pace.get(kind)),
                    )
        for name in ("llm_stop", "tool_stop"):
            if name in suite:
                pace = floor.get("1s") or {}
                yield Row(
                    backend,
                    f"`{name}`: stop → terminal event",
                    "agent",
                    _median(suite[name].get("stop_halt_ms")),
                    _median(pace.get(HALT)),
                )
        for start, where in START_SCENARIOS:
            if start not in suite:
                continue
            # Start trials run back to back, as busy as 10 ms steps: that floor's pacing.
            pace = (suite[start].get("floor") or floor.get("0.01s") or {}).get(HALT)
            for key, what in (
                ("first_step_ms", "start → first step event"),
                ("no_hold_first_step_ms", "start with `no_hold` → first step event"),
            ):
                if key in suite[start]:
                    yield Row(
                        backend,
                        what + where,
                        "10 ms",
                        _median(suite[start].get(key)),
                        _median(pace),
                        target("start_latency", HALT, backend),
                        ours_samples=_samples(suite[start].get(key)),
                        floor_samples=_samples(pace),
                    )
        dbos = peers.get("dbos") or {}
        if "per_step" in suite:
            yield Row(
                backend,
                "per-step overhead (runtime's event times)",
                "—",
                _median(suite["per_step"].get("runtime_ms_per_step")),
                dbos=(dbos.get("per_step_overhead") or {}).get("median_ms"),
            )
        if "concurrency" in suite:
            wall = _median(((dbos.get("concurrency") or {}).get("summary") or {}).get("wall_ms"))
            yield Row(
                backend,
                "200 operations x 20 steps, 100 stopped: wall time",
                "10 ms",
                suite["concurrency"]["wall_seconds"],
                dbos=wall / 1000 if wall is not None else None,
                unit="s",
            )


def _step_key(name: str) -> float:
    try:
        return float(name.split("/", 1)[1].removesuffix("s"))
    except ValueError:
        return math.inf


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def _ratio(ours: float | None, theirs: float | None, bold: bool = False) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "—"
    ratio = ours / theirs
    if ratio >= 100:
        text = f"{ratio:,.0f}{TIMES}"
    elif ratio >= 0.1:
        text = f"{ratio:.2f}{TIMES}"
    else:
        text = f"{ratio:.2g}{TIMES}"
    return f"**{text}**" if bold else text


def _interval(row: Row) -> str:
    if not row.ours_samples or not row.floor_samples:
        return ""
    bounds = ratio_interval(row.ours_samples, row.floor_samples)
    return "" if bounds is None else f"{bounds[0]:.2f}{DASH}{bounds[1]:.2f}"


def _versions(peers: dict[str, Any]) -> str:
    parts = []
    dbos = peers.get("dbos") or {}
    if dbos.get("dbos_version"):
        parts.append(f"DBOS Transact {dbos['dbos_version']} (`cancel_workflow`, same PostgreSQL)")
    server = ((peers.get("langgraph") or {}).get("versions") or {}).get("server") or {}
    if server.get("langgraph-api"):
        parts.append(
            f"LangGraph dev server {server['langgraph-api']} (in-memory, `runs.cancel` interrupt)"
        )
    return "; ".join(parts) or "none in this run"


def markdown(results: dict[str, Any], source: str = "") -> str:
    machine = results.get("machine") or {}
    peers = results.get("peers") or {}
    lines = [
        "| backend | figure | step | Stopline | floor | ÷ floor | 95 % interval | target | "
        "LangGraph | ÷ LangGraph | DBOS | ÷ DBOS |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows(results):
        lines.append(
            f"| {row.backend} | {row.figure} | {row.step} | {_value(row.ours, row.unit)} | "
            f"{_value(row.floor, row.unit)} | {_ratio(row.ours, row.floor, bold=True)} | "
            f"{_interval(row)} | {row.target} | "
            f"{_value(row.langgraph, row.unit)} | {_ratio(row.ours, row.langgraph)} | "
            f"{_value(row.dbos, row.unit)} | {_ratio(row.ours, row.dbos)} |"
        )
    head = (
        f"Run {machine.get('when', '?')} on {machine.get('cpus', '?')} cores, "
        f"{machine.get('memory_gb', '?')} GiB, {machine.get('platform', '?')}, "
        f"Python {machine.get('python', '?')}"
    )
    if source:
        head += f"; raw results: `{source}`"
    notes = [
        head + ".",
        "",
        *(["**Quick run (few trials): indicative only.**", ""] if results.get("quick") else []),
        "Medians; a ratio below 1 means Stopline is faster. *Floor*: the same three-process",
        "topology (client, relay, backend) in raw grpc.aio with no logic, measured in the same run",
        "at the same pacing (bench/floor.py): for a stop scenario, one trial of each kind paired",
        "with each stop (the same pause, alternating which goes first), where the run has them;",
        "otherwise measured in blocks before and after the figures it divides, pooled. An",
        "acknowledgment is divided by floor (a),",
        "one unary call relayed there and back; stop → terminal event and start → first step",
        "event by floor (b), that call plus an event pushed back through the relay's stream.",
        "*95 % interval*: how far the ratio could move by the luck of this run's trials alone",
        "(a bootstrap of the two medians' ratio, each stop resampled with the floor trials",
        "paired with it); a target is met or missed for sure only when the interval is all on",
        "one side of it.",
        f"Peers: {_versions(peers)}. LangGraph's figures are its cancel call's return and its",
        "stream closing (it sends no terminal event); DBOS's are `cancel_workflow`'s return and",
        "the workflow no longer running (ordinary steps: the step in flight runs to its end).",
        "",
    ]
    return "\n".join([*notes, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results JSON written by python -m bench.run")
    args = parser.parse_args()
    print(markdown(json.loads(args.results.read_text()), str(args.results)))


if __name__ == "__main__":
    main()
