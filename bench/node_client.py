"""The Node grpc-js client of the stop-to-halt scenario (bench/node/stop_client.mjs), run from
the Python harness: `npm ci` into bench/node/node_modules on first use (or when the lock file
changed), then one `node` process per run, whose JSON on stdout is summarised here with the same
percentile definition as Stopline's Python scenarios (bench.stats.summary)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.stack import Stack
from bench.stats import summary
from tests.credentials import TOKEN

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


def stop_latency(
    stack: Stack, plan: dict[float, int], own_connection: bool = False
) -> dict[str, Any]:
    """Stop-to-halt and the acknowledgment from Node, for each step length of `plan`."""
    ensure_modules()
    args = {
        "address": stack.gateways[0].address,
        "token": TOKEN,
        "plan": [[step, n] for step, n in plan.items()],
        "own_connection": own_connection,
    }
    done = subprocess.run(
        [node(), str(NODE_DIR / "stop_client.mjs"), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120 + sum(n for n in plan.values()) * 5,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Node client failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    out: dict[str, Any] = {}
    for step, run in report["runs"].items():
        key = f"{float(step.removesuffix('s')):g}s"
        out[key] = {
            "client": "node",
            "versions": report["versions"],
            "stop_connection": "own" if own_connection else "same",
            "ack_ms": summary(run["ack_ms"]),
            "halt_ms": summary(run["halt_ms"]),
            "mid_step": run["mid_step"],
            "trials": run["trials"],
        }
    return out
