"""The benchmark table (with each target checked as a ratio or bound) and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def table(results: dict[str, Any]) -> str:
    lines = [f"machine: {results['machine']}", ""]
    lines.append(f"{'scenario':<44} {'median':>9} {'p99':>9}  unit / note")
    for backend, suite in results["stopline"].items():
        lines.append(f"-- {backend}")
        for name, data in suite.items():
            if name in AGENT_ROWS:
                lines.extend(AGENT_ROWS[name](name, data))
            elif name in ("floor", "floor_before", "floor_after"):
                lines.extend(_floor_rows(name, data))
            elif "halt_ms" in data:
                for key in ("ack_ms", "halt_ms"):
                    s = data[key]
                    lines.append(
                        f"{name + ' ' + key:<44} {_fmt(s['median']):>9} {_fmt(s['p99']):>9}  ms "
                        f"(n={s['n']}, mid-step {data['mid_step']}/{data['trials']})"
                    )
            elif name == "per_step":
                for key in ("runtime_ms_per_step", "client_ms_per_step"):
                    s = data[key]
                    lines.append(f"{name + ' ' + key:<44} {_fmt(s['median']):>9} {'':>9}  ms/step")
            elif name == "streaming":
                for streams in ("1_streams", "50_streams"):
                    d = data[streams]
                    lines.append(
                        f"{'streaming ' + streams:<44} {d['gateway']['events_per_second']:>9.0f} "
                        f"{'':>9}  events/s; raw {d['raw_baseline']['events_per_second']:.0f}; "
                        f"ratio {d['ratio']:.2f}"
                    )
            elif name == "start_latency":
                h = data["stop_halt_1s_ms"]
                for arm, prefix in (("start -> first step_started", ""), ("  no hold", "no_hold_")):
                    s = data.get(f"{prefix}first_step_ms")
                    if s is None:
                        continue  # a result from before the no-hold arm
                    lines.append(
                        f"{arm:<44} {_fmt(s['median']):>9} "
                        f"{_fmt(s['p99']):>9}  ms (n={s['n']}); stop halt 1 s "
                        f"{_fmt(h['median'])} ms; ratio {data[prefix + 'ratio_to_stop_halt']:.2f}"
                    )
            elif name == "early_stop":
                lines.append(
                    f"{'early stop (by key)':<44} {data['operations_with_a_step_started']:>9} "
                    f"{'':>9}  operations with a step started, of {data['trials']}"
                )
                for delay, row in data.get("by_delay", {}).items():
                    lines.append(
                        f"{'  stop by key ' + delay + ' after the start call':<44} "
                        f"{row['operations_with_a_step_started']:>9} {'':>9}  of {row['trials']} "
                        f"(recorded ahead {row['recorded_ahead']})"
                    )
            elif name == "concurrency":
                wall = data["wall_seconds"]
                each = ", ".join(f"{w:.2f}" for w in data.get("wall_seconds_each", [wall]))
                lines.append(
                    f"{'concurrency 200x20x10ms':<44} {wall:>9.2f} {'':>9}  s wall (median of "
                    f"{each}); stopped {data['stopped']}, wrong {data['wrong_final_state']}, "
                    f"missing {data['missing']}; acknowledged pending "
                    f"{data.get('acknowledged_pending', 0)}"
                )
            elif name == "observability":
                for figure, f in data["figures"].items():
                    lines.append(
                        f"{'observability on/off ' + figure:<44} {f['ratio_median']:>9.3f} "
                        f"{f['ratio_p99']:>9.3f}  ratio (off {_fmt(f['off']['median'])}, on "
                        f"{_fmt(f['on']['median'])} ms; really on: {data['really_on']})"
                    )
            elif name == "capacity":
                lines.append(
                    f"{'capacity (1 s steps)':<44} {data['running']:>9} {'':>9}  running of "
                    f"{data['started']}; steps/s {data['steps_per_second_achieved']:.0f} of "
                    f"{data['steps_per_second_asked']}; RSS {data['rss_mb']:.0f} MB; "
                    f"CPU {data['cpu_percent']:.0f}%"
                )
    for peer, data in results.get("peers", {}).items():
        lines.append(f"-- peer {peer}")
        if "error" in data:
            lines.append(f"   not measured: {data['error']}")
            continue
        for name, value in data.items():
            if isinstance(value, dict) and "median" in value:
                lines.append(f"{name:<44} {_fmt(value['median']):>9} {_fmt(value['p99']):>9}  ms")
            elif isinstance(value, dict):
                for key, inner in value.items():
                    if isinstance(inner, dict) and "median" in inner:
                        median, p99 = _fmt(inner["median"]), _fmt(inner["p99"])
                        lines.append(f"{name + ' ' + key:<44} {median:>9} {p99:>9}  ms")
                    elif isinstance(inner, int | float | str | bool):
                        lines.append(f"{name + ' ' + key:<44} {inner!s:>9}")
    lines.extend(_ratios(results))
    lines.extend(_agent_ratios(results))
    return "\n".join(lines)


def _floor_rows(name: str, data: dict[str, Any]) -> list[str]:
    """Raw gRPC, client -> relay -> backend (bench/floor.py): (a) the unary call alone, (b) the
    call plus the event pushed back through the relay's stream, paced like each step length;
    `floor` is the two measurements (`floor_before`, `floor_after` the stops) pooled."""
    lines = []
    for step, d in data.items():
        if not isinstance(d, dict):
            continue
        for key, what in (("unary_ms", "(a) unary"), ("push_ms", "(b) call -> pushed event")):
            lines.append(_row(f"{name}/{step} {what}", d[key], f"ms (n={d[key]['n']})"))
    return lines


def _row(label: str, s: dict[str, Any], note: str) -> str:
    return f"{label:<44} {_fmt(s['median']):>9} {_fmt(s['p99']):>9}  {note}"


def _stop_rows(name: str, data: dict[str, Any]) -> list[str]:
    first = "disconnect_ms" if "disconnect_ms" in data else "process_exited_ms"
    trials = data["trials"]
    return [
        _row(f"{name} {first}", data[first], f"ms (n={data[first]['n']} of {trials})"),
        _row(f"{name} stop_halt_ms", data["stop_halt_ms"], "ms (stop call -> terminal event)"),
    ]


def _load_note(run: dict[str, Any]) -> str:
    s = run["steady"] or run["all"]
    return (
        f"ms; {run['operations']} op(s), {100 * s['within_100ms']:.1f}% within 100 ms, "
        f"{run['tokens_received']}/{run['tokens_expected']} tokens, "
        f"{run['completed']}/{run['operations']} completed, "
        f"cpu% {run.get('steady_cpu_percent') or run['cpu_percent']}"
    )


def _latency_rows(name: str, data: dict[str, Any]) -> list[str]:
    return [_row(f"{name} (token send -> client)", data["steady"] or data["all"], _load_note(data))]


def _capacity_rows(name: str, data: dict[str, Any]) -> list[str]:
    lines = [
        f"{'llm_capacity (50 tokens/s, >=95% in 100 ms)':<44} {data['largest_passing']:>9} "
        f"{'':>9}  largest passing load; first failing {data['failing']}"
    ]
    for run in data["runs"]:
        label = f"  load {run['operations']} ({'pass' if run['passed'] else 'FAIL'})"
        lines.append(_row(label, run["steady"] or run["all"], _load_note(run)))
    return lines


AGENT_ROWS = {
    "llm_stop": _stop_rows,
    "tool_stop": _stop_rows,
    "token_latency": _latency_rows,
    "token_latency_no_window": _latency_rows,
    "llm_capacity": _capacity_rows,
}


def _agent_ratios(results: dict[str, Any]) -> list[str]:
    """Issue 13's targets, each against a figure of the same run and backend."""
    lines: list[str] = []
    for backend, suite in results["stopline"].items():
        ticker = suite.get("ticker_stop/1s", {}).get("halt_ms")
        if ticker is None:
            continue
        lines.append(
            f"-- issue 13 targets, {backend} (ticker stop-to-halt {ticker['median']:.2f} ms)"
        )
        if "llm_stop" in suite:
            ours = suite["llm_stop"]["disconnect_ms"]
            ratio = ours["median"] / ticker["median"]
            lines.append(
                f"{'stop -> model server sees close':<44} {ratio:>8.2f}x {'':>9}  of ticker halt "
                f"(target <= 1.2x; p99 {ours['p99']:.2f} vs {ticker['p99']:.2f} ms)"
            )
        if "tool_stop" in suite:
            data = suite["tool_stop"]
            bound = data["stop_grace_seconds"] * 1000 + ticker["median"]
            exited = data["process_exited_ms"]
            lines.append(
                f"{'stop -> blocking tool process exited':<44} {exited['median'] / bound:>8.2f}x "
                f"{'':>9}  of grace + ticker halt = {bound:.0f} ms (target <= 1; p99 "
                f"{exited['p99']:.1f} ms)"
            )
        capacity = suite.get("llm_capacity")
        single = suite.get("token_latency")
        if single:
            median = (single["steady"] or single["all"])["median"]
            passing = [r for r in (capacity or {}).get("runs", []) if r["passed"]]
            if passing:
                top = passing[-1]
                p99 = (top["steady"] or top["all"])["p99"]
                lines.append(
                    f"{'token p99 at largest load / 1-op median':<44} {p99 / median:>8.2f}x "
                    f"{'':>9}  ({p99:.1f} ms at {top['operations']} ops vs {median:.1f} ms; "
                    "target <= 3x)"
                )
            off = suite.get("token_latency_no_window")
            if off:
                cost = median - (off["steady"] or off["all"])["median"]
                lines.append(f"{'delta window cost (median, 1 op)':<44} {cost:>9.1f} {'':>9}  ms")
        if capacity:
            lines.append(
                f"{'llm capacity':<44} {capacity['largest_passing']:>9} {'':>9}  operations "
                "(target >= 500 on SQLite)"
            )
    return lines


def _ratios(results: dict[str, Any]) -> list[str]:
    """The targets stated against the durable-execution peer, from this run's medians."""
    dbos = results.get("peers", {}).get("dbos", {})
    if "error" in dbos or not dbos:
        return []
    lines = ["-- against DBOS, same run"]
    concurrency = dbos.get("concurrency", {}).get("summary", {}).get("wall_ms")
    per_step = dbos.get("per_step_overhead", {}).get("median_ms")
    for backend, suite in results["stopline"].items():
        if concurrency and "concurrency" in suite:
            ours = suite["concurrency"]["wall_seconds"]
            theirs = concurrency["median"] / 1000
            lines.append(
                f"{'concurrency ' + backend:<44} {theirs / ours:>8.1f}x {'':>9}  faster "
                f"(DBOS {theirs:.2f} s, median of {concurrency['n']}; Stopline {ours:.2f} s)"
            )
        if per_step and "per_step" in suite:
            ours = suite["per_step"]["runtime_ms_per_step"]["median"]
            lines.append(
                f"{'per-step ' + backend:<44} {ours / per_step:>9.2f} {'':>9}  of DBOS's "
                f"({ours:.2f} vs {per_step:.2f} ms)"
            )
    return lines


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for backend, suite in results["stopline"].items():
        names = [n for n, d in suite.items() if "halt_ms" in d and d["halt_ms"]["samples"]]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.boxplot([suite[n]["halt_ms"]["samples"] for n in names], showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("stop call -> terminal event at the client (ms, log)")
        ax.set_title(f"Stop-to-halt through the gateway ({backend})")
        fig.tight_layout()
        fig.savefig(out / f"stop_latency_{backend}.png", dpi=110)
        plt.close(fig)
        streaming = suite.get("streaming")
        if streaming:
            fig, ax = plt.subplots(figsize=(6, 4))
            labels, values = [], []
            for streams in ("1_streams", "50_streams"):
                labels += [f"gateway {streams}", f"raw {streams}"]
                values += [
                    streaming[streams]["gateway"]["events_per_second"],
                    streaming[streams]["raw_baseline"]["events_per_second"],
                ]
            ax.bar(labels, values, color=["tab:blue", "tab:gray"] * 2)
            ax.set_ylabel("events per second")
            ax.set_title(f"Streaming throughput ({backend})")
            plt.setp(ax.get_xticklabels(), rotation=15, fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"streaming_{backend}.png", dpi=110)
            plt.close(fig)
