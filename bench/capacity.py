"""Issue 17's capacity figure: N `ticker` operations with 1-second steps on one runtime process.

    python -m bench.capacity --ops 10000 --backends sqlite,postgresql [--profile 20] [--ceiling]

Each operation emits one chunk and checkpoints one step a second, so N operations ask for N steps
a second (2N writes). Reported per backend: the steps per second achieved over a steady window
(counted in the database, before and after) against the N asked, the runtime's RSS growth per
operation (RSS once all N run, minus RSS before the first start), and the runtime's CPU over the
window. The load generator is this process: it starts the operations straight on the runtime (no
gateway, no streams) and then only counts rows, so its own CPU over the window is reported
beside the runtime's to show it is not the limit. With `--profile S`, `py-spy record --gil` then
samples the runtime for S seconds under the same load (raw stacks in bench/results/profiles/).
With `--ceiling`, bench/capacity_ceiling.py runs the same load with no Stopline logic in the same
run, and each backend's steps/s is given as a fraction of it (what the machine can do at all).
With `--idle-replica` (PostgreSQL), a second runtime replica shares the database, with room for
one operation (the rest are started and run on the first) and no watchers: its CPU over the
window is what one replica pays for another's work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import capacity_ceiling
from bench.load_scenarios import _steps_completed, start_tickers
from bench.profiling import top_frames
from bench.scenarios import Clients
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
# A thread's line in `py-spy dump`: 'Thread 15314 (idle): "ThreadPoolExecutor-0_0"'.
THREAD_LINE = re.compile(r'^Thread (\d+) \([^)]*\): "([^"]*)"', re.MULTILINE)


async def capacity(
    stack: Stack,
    n: int,
    window_seconds: float,
    settle_seconds: float,
    profile_seconds: int = 0,
    profile_dir: Path | None = None,
    waits: bool = False,
) -> dict[str, Any]:
    import psutil  # bench extra only

    clients = Clients(stack)
    runtime = clients.runtimes[0]
    proc = psutil.Process(stack.runtimes[0].process.pid)
    # The other replicas, if any, run nothing of this load: what they pay for it.
    others = [psutil.Process(r.process.pid) for r in stack.runtimes[1:]]
    me = psutil.Process()
    rss_before = proc.memory_info().rss
    out: dict[str, Any] = {"operations": n}
    try:
        started, running, all_running = await start_tickers(runtime, n, 60.0, 0.5)
        out["start_seconds"] = started
        out["running"] = running
        out["all_running_seconds"] = all_running
        await asyncio.sleep(settle_seconds)  # let the start burst's backlog drain
        rss_after = proc.memory_info().rss
        before = await _steps_completed(stack)
        t0, rt0, me0 = time.perf_counter(), proc.cpu_times(), me.cpu_times()
        threads0 = _thread_seconds(proc)
        others0 = [other.cpu_times() for other in others]
        psutil.cpu_percent(None)
        await asyncio.sleep(window_seconds)
        after = await _steps_completed(stack)
        elapsed = time.perf_counter() - t0
        rt1, me1 = proc.cpu_times(), me.cpu_times()
        threads1 = _thread_seconds(proc)
        if others:
            others1 = [other.cpu_times() for other in others]
            out["idle_replica_cpu_percent"] = [
                100 * (c1.user + c1.system - c0.user - c0.system) / elapsed
                for c0, c1 in zip(others0, others1, strict=True)
            ]
        machine = psutil.cpu_percent(None)
        achieved = (after - before) / elapsed
        out.update(
            steps_per_second_asked=n,
            steps_per_second_achieved=achieved,
            fraction_of_nominal=achieved / n,
            runtime_cpu_percent=100 * (rt1.user + rt1.system - rt0.user - rt0.system) / elapsed,
            client_cpu_percent=100 * (me1.user + me1.system - me0.user - me0.system) / elapsed,
            machine_cpu_percent=machine,
            load_average=os.getloadavg(),
            runtime_cpu_us_per_step=1e6
            * (rt1.user + rt1.system - rt0.user - rt0.system)
            / max(1, after - before),
            rss_before_mb=rss_before / 2**20,
            rss_after_mb=rss_after / 2**20,
            rss_kib_per_operation=(rss_after - rss_before) / 1024 / n,
            window_seconds=elapsed,
            runtime_threads_cpu_percent=_thread_shares(proc.pid, threads0, threads1, elapsed),
        )
        if profile_seconds:
            out["profile"] = await _profile(
                proc.pid, profile_seconds, profile_dir or RESULTS, waits
            )
    finally:
        await clients.close()
    return out


def _thread_seconds(proc: Any) -> dict[int, float]:
    """CPU seconds so far of each of the process's threads, by thread id."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def _thread_shares(
    pid: int, before: dict[int, float], after: dict[int, float], elapsed: float
) -> dict[str, float]:
    """Each thread's CPU over the window in % of a core, busiest first, by its Python name where
    py-spy can tell it (`MainThread` runs the event loop; the database's threads are named by
    their executors), else by thread id. Which thread the work sits on says which part of it
    the GIL serialises with the event loop."""
    names = _thread_names(pid)
    shares: dict[str, float] = {}
    for tid, seconds in after.items():
        used = 100 * (seconds - before.get(tid, 0.0)) / elapsed
        if used >= 0.5:
            shares[f"{names.get(tid, 'thread')} ({tid})"] = round(used, 1)
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def _thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from one `py-spy dump` ({} without py-spy)."""
    spy = _py_spy()
    if spy is None:
        return {}
    try:
        dump = subprocess.run(
            [spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in THREAD_LINE.findall(dump)}


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def _profile(pid: int, seconds: int, out: Path, waits: bool) -> dict[str, Any]:
    """py-spy's samples of the runtime: of whichever thread holds the GIL (where the CPU goes),
    or with `waits` of every thread, idle or not, each stack under its thread (where each one
    waits: the event loop in its selector, the database thread in SQLite or for work)."""
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    path = out / f"capacity-runtime-{pid}{'-waits' if waits else ''}.txt"
    which = ("--idle", "--threads") if waits else ("--gil",)
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "-d", str(seconds), "-r", "100", *which, "-p", str(pid),
        "--format", "raw", "-o", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if not path.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    return {"path": str(path), **top_frames(path, count=25)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--profile", type=int, default=0, help="py-spy seconds (0: none)")
    parser.add_argument(
        "--waits",
        action="store_true",
        help="profile every thread, idle too (where each waits), not only the GIL's holder",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also run bench.capacity_ceiling with the same N (the bare minimum of the same "
        "load, no Stopline logic) and give each backend's steps/s as a ratio to it",
    )
    parser.add_argument(
        "--idle-replica",
        action="store_true",
        help="PostgreSQL: a second replica on the same database that runs and watches none of "
        "the operations; its CPU over the window is reported",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "capacity.json")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            # Room for every operation (the bench Stack's default --max-running is 5,000).
            extra = ("--max-running", str(args.ops + 100))
            replicas = 2 if args.idle_replica and backend == "postgresql" else 1
            # The idle replica may claim one operation at most (the others, started on the
            # first replica while it is saturated, would otherwise be claimed there too).
            idle = ("--max-running", "1") if replicas > 1 else ()
            with Stack(
                backend, Path(tmp), replicas=replicas, runtime_args=extra, last_replica_args=idle
            ) as stack:
                results[backend] = asyncio.run(
                    capacity(
                        stack,
                        args.ops,
                        args.window,
                        args.settle,
                        args.profile,
                        RESULTS / "profiles",
                        args.waits,
                    )
                )
            summary = {k: v for k, v in results[backend].items() if k != "profile"}
            print(backend, json.dumps(summary, indent=1, default=str), flush=True)
            if "profile" in results[backend]:
                profile = results[backend]["profile"]
                for key in ("areas_percent", "own_percent"):
                    print(key, json.dumps(profile.get(key), indent=1), flush=True)
    if args.ceiling:
        ceiling = capacity_ceiling.measure(args.ops, args.window, args.settle)
        results["ceiling"] = ceiling
        print("ceiling", json.dumps(ceiling, indent=1, default=str), flush=True)
        for backend in args.backends.split(","):
            share = (
                results[backend]["steps_per_second_achieved"] / ceiling["steps_per_second_achieved"]
            )
            results[backend]["of_ceiling"] = share
            print(f"{backend}: {share:.2f} of the ceiling's steps/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
