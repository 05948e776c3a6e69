"""The Node grpc-js client of the stop-to-halt scenario (bench/node/stop_client.mjs), run from
the Python harness: `npm ci` into bench/node/node_modules on first use (or when the lock file
changed), then one `node` process per run, told one trial at a time over its stdin. Between
them this harness runs the floor trials paired with each (as scenarios.stop_latency does for its
Python client), so the Node rows are divided by a floor measured at the same moments; the
results are summarised with the same percentile definition as the Python scenarios
(bench.stats.summary)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.scenarios import Floor, Pairing
from bench.stack import Stack
from bench.stats import summary
from tests.credentials import TOKEN

# The longest one trial may take before the Node client is taken to be stuck.
TRIAL_TIMEOUT_SECONDS = 60.0

NODE_DIR = Path(__file__).resolve().parent / "node"
STAMP = NODE_DIR / "node_modules" / ".package-lock.json"


def node() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed (the Node client needs Node.js >= 18)")
    return found


def ensure_modules() -> None:
    """`npm ci` unless node_modules is already there for this lock file. npm writes
    node_modules/.package-lock.json on every install, so it is newer than the lock it installed."""
    lock = NODE_DIR / "package-lock.json"
    if STAMP.exists() and STAMP.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (needed once to install bench/node's packages)")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        check=True,
        timeout=600,
    )


async def stop_latency(
    stack: Stack,
    plan: dict[float, int],
    own_connection: bool = False,
    floor: Floor | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """Stop-to-halt and the acknowledgment from Node, for each step length of `plan`; with
    `floor`, a floor trial of each kind beside each Node trial, at its pause, alternating which
    goes first (scenarios.stop_latency's pairing)."""
    await asyncio.to_thread(ensure_modules)
    args = {
        "address": stack.gateways[0].address,
        "token": TOKEN,
        "own_connection": own_connection,
    }
    proc = await asyncio.create_subprocess_exec(
        node(), str(NODE_DIR / "stop_client.mjs"), json.dumps(args),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    async def answer() -> dict[str, Any]:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), TRIAL_TIMEOUT_SECONDS)
        if not line:
            err = b"" if proc.stderr is None else await proc.stderr.read()
            raise RuntimeError(f"the Node client failed: {err.decode(errors='replace').strip()}")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    rng = random.Random(seed)
    out: dict[str, Any] = {}
    try:
        versions = (await answer())["versions"]
        for step, n in plan.items():
            ack: list[float] = []
            halt: list[float] = []
            pairing = Pairing(floor)
            mid_step = 0
            for trial in range(n):
                pause = rng.uniform(0, min(step, 1.0) * 0.5)
                await pairing.before(trial, step, pause)
                asked = {"step_seconds": step, "pause_seconds": pause}
                proc.stdin.write(f"{json.dumps(asked)}\n".encode())
                await proc.stdin.drain()
                result = await answer()
                ack.append(result["ack_ms"])
                halt.append(result["halt_ms"])
                mid_step += int(result["mid_step"])
                await pairing.after(trial, step, pause)
            run: dict[str, Any] = {
                "client": "node",
                "versions": versions,
                "stop_connection": "own" if own_connection else "same",
                "ack_ms": summary(ack),
                "halt_ms": summary(halt),
                "mid_step": mid_step,
                "trials": n,
            }
            pairing.report(run, "Node stop")
            out[f"{step:g}s"] = run
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return out
