"""CPU per streamed chunk of the `llm` agent's model calls, without the rest of the runtime.

Issue 13's capacity is bounded by the CPU the runtime spends on each SSE chunk it reads from the
model (BENCHMARKS.md). This isolates that cost: one fake model server process streaming at
50 tokens/s, and a child process that runs `ops` concurrent `Provider.stream_answer` calls (the
`llm` agent's reader, its `on_text` a no-op) and reports its own CPU seconds per chunk. Each
variant (HTTP transport x event loop) runs in a fresh child, the variants alternate over
`--rounds`, and the figures are compared as ratios within the run (the VM is shared and noisy).

    python -m bench.llm_chunk_cpu --ops 100 --tokens 300 --rounds 3

`--side-by-side OPS TOKENS ROUNDS [JSON]` runs the whole stack instead: two runtimes (one per
transport) with their gateways, loaded at the same time by the same client and fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.stack import REPO, FakeLLMProcess

VARIANTS = ("httpx2", "aiohttp", "httpx2+uvloop", "aiohttp+uvloop")


async def _child(base_url: str, transport: str, ops: int, tokens: int) -> dict[str, Any]:
    from runtime_service.agents.llm_provider import Provider
    from runtime_service.config import LLMSettings

    settings = LLMSettings(base_url=base_url, model="fake-model", http_transport=transport)
    provider = Provider(settings)
    chunks = 0

    async def on_text(text: str) -> None:
        nonlocal chunks
        chunks += 1

    async def one() -> None:
        await provider.stream_answer(
            step=1,
            model="fake-model",
            messages=[{"role": "user", "content": "go"}],
            tools=(),
            temperature=None,
            on_text=on_text,
        )

    await one()  # warm-up: imports, the first connection
    chunks = 0
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(one() for _ in range(ops)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await provider.aclose()
    assert chunks == ops * tokens, (chunks, ops * tokens)
    return {"cpu_seconds": cpu, "wall_seconds": wall, "chunks": chunks}


def child_main(argv: list[str]) -> None:
    base_url, variant, ops, tokens = argv[0], argv[1], int(argv[2]), int(argv[3])
    transport, _, loop = variant.partition("+")
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_child(base_url, transport, ops, tokens))
    print(json.dumps(result))


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux), in seconds."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(ops: int, tokens: int, rounds: int, variants: list[str]) -> dict[str, Any]:
    fake = FakeLLMProcess(tokens=tokens, tokens_per_second=50.0)
    per: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    try:
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for variant in order:
                fake_cpu = _cpu_seconds(fake.process.pid)
                out = subprocess.run(
                    [sys.executable, "-m", "bench.llm_chunk_cpu", "--child", fake.base_url,
                     variant, str(ops), str(tokens)],
                    cwd=REPO, capture_output=True, text=True, check=True,
                )  # fmt: skip
                fake_cpu = _cpu_seconds(fake.process.pid) - fake_cpu
                result = json.loads(out.stdout.strip().splitlines()[-1])
                chunks = result["chunks"]
                row = {
                    "reader_us_per_chunk": result["cpu_seconds"] / chunks * 1e6,
                    "fake_us_per_chunk": fake_cpu / chunks * 1e6,
                    "wall_seconds": result["wall_seconds"],
                }
                per[variant].append(row)
                print(f"round {r} {variant:16s} reader {row['reader_us_per_chunk']:6.1f} us/chunk"
                      f"  fake {row['fake_us_per_chunk']:6.1f} us/chunk", flush=True)  # fmt: skip
    finally:
        fake.close()
    first = per[variants[0]]
    summary = {}
    for variant, rows in per.items():
        med = statistics.median(x["reader_us_per_chunk"] for x in rows)
        # Paired within each round (the neighbours' load moves between rounds, less within one).
        paired = [
            x["reader_us_per_chunk"] / f["reader_us_per_chunk"]
            for x, f in zip(rows, first, strict=True)
        ]
        summary[variant] = {
            "reader_us_per_chunk_median": med,
            "ratio_to_first": statistics.median(paired),
            "paired_ratios": paired,
            "fake_us_per_chunk_median": statistics.median(x["fake_us_per_chunk"] for x in rows),
            "rounds": rows,
        }
    return {"ops": ops, "tokens": tokens, "rounds": rounds, "variants": summary}


async def _side_by_side(ops: int, tokens: int, rounds: int) -> dict[str, Any]:
    """The whole runtime, old and new at once: two stacks (runtime + gateway) on one fake, one
    with each transport, each streaming `ops` operations at the same time, so both meet the
    same neighbours' load. Each runtime's and gateway's CPU per chunk over its steady window."""
    import tempfile
    from pathlib import Path

    from bench.agent_scenarios import token_load
    from bench.stack import Stack

    fake = FakeLLMProcess(tokens=tokens, tokens_per_second=50.0)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stacks = {
                t: Stack(
                    "sqlite",
                    Path(tmp),
                    runtime_args=(*fake.runtime_args(), "--llm-http-transport", t),
                )
                for t in ("aiohttp", "httpx2")
            }
            try:
                # Warm-up: each runtime imports the SDK on its first `llm` step.
                await asyncio.gather(*(token_load(s, fake, 1, 10, 0) for s in stacks.values()))
                for r in range(rounds):
                    runs = await asyncio.gather(
                        *(
                            token_load(s, fake, ops, tokens, ramp_seconds=1.0)
                            for s in stacks.values()
                        )
                    )
                    row: dict[str, Any] = {}
                    for t, run in zip(stacks, runs, strict=True):
                        us = run["cpu_per_chunk"].get("us_per_chunk", {})
                        figures = run["steady"] or run["all"]
                        row[t] = {
                            "runtime_us_per_chunk": us.get("runtime"),
                            "gateway_us_per_chunk": us.get("gateway"),
                            "within_100ms": figures["within_100ms"],
                            "p99_ms": figures["p99"],
                        }
                    row["runtime_ratio"] = (
                        row["aiohttp"]["runtime_us_per_chunk"]
                        / row["httpx2"]["runtime_us_per_chunk"]
                    )
                    rows.append(row)
                    print(f"round {r}: {json.dumps(row)}", flush=True)
            finally:
                for s in stacks.values():
                    s.close()
    finally:
        fake.close()
    return {
        "ops_per_stack": ops,
        "tokens": tokens,
        "rounds": rows,
        "runtime_ratio_median": statistics.median(r["runtime_ratio"] for r in rows),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--side-by-side":
        ops, tokens, rounds = (int(x) for x in sys.argv[2:5])
        result = asyncio.run(_side_by_side(ops, tokens, rounds))
        print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
        if len(sys.argv) > 5:
            with open(sys.argv[5], "w") as f:
                json.dump(result, f, indent=1)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = run(args.ops, args.tokens, args.rounds, args.variants.split(","))
    for variant, s in result["variants"].items():
        print(
            f"{variant:16s} reader {s['reader_us_per_chunk_median']:6.1f} us/chunk "
            f"(paired ratio {s['ratio_to_first']:.2f}x)  "
            f"fake {s['fake_us_per_chunk_median']:6.1f} us/chunk"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
