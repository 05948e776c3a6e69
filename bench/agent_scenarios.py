"""Issue 13's scenarios: real agent work (the `llm` agent against the fake model server).

Every figure is taken against another figure of the same run, because this VM's speed moves by
2x between days. Times that cross processes use `time.monotonic()`, which is one clock for every
process on the host: the fake model server (`python -m fake_llm`, a process of its own) records
when a client closed its connection and stamps each token with the time it was sent; the bench
client reads both and compares them with its own `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf import struct_pb2

from bench import scenarios
from bench.cpu_accounting import cpu_per_chunk, cpu_pressure, cpu_seconds
from bench.profiling import top_frames
from bench.scenarios import Clients, _is_terminal
from bench.stack import FakeLLMProcess, Stack
from bench.stats import percentile, summary
from runtime_service.config import LLMSettings, RuntimeConfig
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from stopline.transport import open_channel
from tests.credentials import TOKEN, WithToken

ms = 1000.0
SCENARIOS = ("llm_stop", "tool_stop", "token_latency", "llm_capacity")
SPIN = "import os\nprint(f'pid={os.getpid()}', flush=True)\nwhile True:\n    pass\n"


def _llm(tools: list[str] | None = None) -> gw.StartAndStreamRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "go"}]}
    if tools:
        values["tools"] = tools
    s = struct_pb2.Struct()
    s.update(values)
    return gw.StartAndStreamRequest(
        agent="llm", input=s, cancel_policy=gw.CANCEL_POLICY_KEEP_RUNNING
    )


def _kind(update: Any) -> str | None:
    if update.WhichOneof("update") != "event":
        return None
    kind: str | None = update.event.WhichOneof("kind")
    return kind


@asynccontextmanager
async def _control(fake: FakeLLMProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=fake.control + "/") as session:
        yield session


async def _script(session: aiohttp.ClientSession, turns: list[dict[str, Any]]) -> None:
    async with session.post("_fake/script", json={"script": turns}) as reply:
        reply.raise_for_status()


async def _records(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with session.get("_fake/requests") as reply:
        reply.raise_for_status()
        records: list[dict[str, Any]] = (await reply.json())["requests"]
        return records


async def _clear(session: aiohttp.ClientSession) -> None:
    async with session.delete("_fake/requests") as reply:
        reply.raise_for_status()


async def llm_stop(
    stack: Stack, fake: FakeLLMProcess, trials: int, seed: int = 3
) -> dict[str, Any]:
    """Stop an `llm` operation at a random moment while its answer streams at 50 tokens/s: the
    stop call's start -> the model server records the connection closed (and -> the terminal
    event at the client)."""
    rng = random.Random(seed)
    clients = Clients(stack)
    disconnect: list[float] = []
    halt: list[float] = []
    ack: list[float] = []
    mid_step = 0
    try:
        async with _control(fake) as session:
            for _ in range(trials):
                await _clear(session)
                await _script(session, [{"kind": "text", "tokens": 5000}])
                call = clients.gateways[0].StartAndStream(_llm())
                op_id = ""
                async for update in call:
                    if update.WhichOneof("update") == "accepted":
                        op_id = update.accepted.operation_id
                    if _kind(update) == "text_delta":
                        break
                await asyncio.sleep(rng.uniform(0, 0.5))
                began = time.monotonic()
                await clients.gateways[0].StopOperation(
                    gw.StopOperationRequest(operation_id=op_id, reason="bench")
                )
                ack.append((time.monotonic() - began) * ms)
                async for update in call:
                    if _is_terminal(update):
                        halt.append((time.monotonic() - began) * ms)
                        if _kind(update) == "interrupted":
                            mid_step += int(update.event.interrupted.mid_step)
                        break
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    records = await _records(session)
                    closed = [r["client_closed_at"] for r in records if r["client_closed_at"]]
                    if closed:
                        disconnect.append((closed[0] - began) * ms)
                        break
                    await asyncio.sleep(0.01)
    finally:
        await clients.close()
    return {
        "disconnect_ms": summary(disconnect),
        "ack_ms": summary(ack),
        "stop_halt_ms": summary(halt),
        "mid_step": mid_step,
        "trials": trials,
    }


def _exited(pid: int) -> bool:
    import psutil  # bench extra only

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def tool_stop(
    stack: Stack, fake: FakeLLMProcess, trials: int, seed: int = 4
) -> dict[str, Any]:
    """An `llm` operation whose model asks for the built-in `python` tool running `while True:
    pass` (a blocking tool, in a worker process): stop it; the stop call's start -> that worker
    process has exited (polled every millisecond), and -> the terminal event at the client."""
    import psutil  # bench extra only

    rng = random.Random(seed)
    clients = Clients(stack)
    runtime = psutil.Process(stack.runtimes[0].process.pid)
    exited: list[float] = []
    halt: list[float] = []
    cancelled = 0
    arguments = json.dumps({"code": SPIN, "timeout_seconds": 60})
    turn = {"kind": "tool_calls", "calls": [{"name": "python", "arguments": arguments}]}
    try:
        async with _control(fake) as session:
            for _ in range(trials):
                await _script(session, [{**turn, "tokens_per_second": 0}])
                call = clients.gateways[0].StartAndStream(_llm(tools=["python"]))
                op_id, pid = "", 0
                async for update in call:
                    if update.WhichOneof("update") == "accepted":
                        op_id = update.accepted.operation_id
                    if _kind(update) == "output_chunk" and "pid=" in update.event.output_chunk.text:
                        pid = int(update.event.output_chunk.text.split("pid=")[1].split()[0])
                        break
                workers = {p.pid for p in runtime.children(recursive=True)}
                assert pid in workers, f"worker {pid} is not the runtime's child ({workers})"
                await asyncio.sleep(rng.uniform(0, 0.2))
                began = time.monotonic()

                async def to_halt(began: float = began, call: Any = call) -> float:
                    async for update in call:
                        if _is_terminal(update):
                            return (time.monotonic() - began) * ms
                    raise AssertionError("stream ended without a terminal event")

                halted = asyncio.create_task(to_halt())
                await clients.gateways[0].StopOperation(
                    gw.StopOperationRequest(operation_id=op_id, reason="bench")
                )
                while True:  # another process: nothing to await but its state
                    if _exited(pid):
                        break
                    await asyncio.sleep(0.001)
                exited.append((time.monotonic() - began) * ms)
                halt.append(await halted)
                events = clients.gateways[0].StreamOperation(
                    gw.StreamOperationRequest(operation_id=op_id, after_seq=0)
                )
                async for update in events:
                    cancelled += int(_kind(update) == "tool_call_cancelled")
                    if _is_terminal(update):
                        break
    finally:
        await clients.close()
    return {
        "process_exited_ms": summary(exited),
        "stop_halt_ms": summary(halt),
        "tool_calls_cancelled": cancelled,
        "stop_grace_seconds": RuntimeConfig().stop_grace_seconds,
        "trials": trials,
    }


def _token_summary(latencies: list[float]) -> dict[str, Any]:
    """Like stats.summary without the samples (a load run has hundreds of thousands)."""
    return {
        "n": len(latencies),
        "median": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 99),
        "max": max(latencies) if latencies else float("nan"),
        "within_100ms": (
            sum(1 for x in latencies if x <= 100) / len(latencies) if latencies else 0.0
        ),
    }


async def token_load(
    stack: Stack,
    fake: FakeLLMProcess,
    operations: int,
    tokens: int,
    ramp_seconds: float,
    seed: int = 5,
) -> dict[str, Any]:
    """`operations` concurrent `llm` operations, each streaming `tokens` tokens at 50 tokens/s,
    started over `ramp_seconds`. Each token carries the fake's send time; the client times it
    to the receipt of the text_delta holding it. Tokens sent while every operation was streaming
    (the steady window) are reported apart from all tokens."""
    import psutil  # bench extra only

    rng = random.Random(seed)
    channels = [open_channel(stack.gateways[0].address) for _ in range(min(8, operations))]
    stubs = [WithToken(gw_grpc.GatewayServiceStub(c), TOKEN) for c in channels]
    samples: list[tuple[float, float]] = []  # (sent, latency ms)
    spans: list[tuple[float, float]] = []
    received: list[int] = []
    completed = 0
    me = psutil.Process()
    runtime = psutil.Process(stack.runtimes[0].process.pid)
    gateway = psutil.Process(stack.gateways[0].process.pid)

    async def one(i: int) -> None:
        nonlocal completed
        await asyncio.sleep(rng.uniform(0, ramp_seconds))
        first = last = 0.0
        count = 0
        async for update in stubs[i % len(stubs)].StartAndStream(_llm()):
            kind = _kind(update)
            if kind == "text_delta":
                now = time.monotonic()
                for stamp in update.event.text_delta.text.split():
                    sent = float(stamp)
                    samples.append((sent, (now - sent) * ms))
                    first = first or sent
                    last = sent
                    count += 1
            elif _is_terminal(update):
                completed += int(kind == "completed")
                break
        spans.append((first, last))
        received.append(count)

    processes = {
        "client": me,
        "runtime": runtime,
        "gateway": gateway,
        "fake_llm": psutil.Process(fake.process.pid),
    }
    steady_cpu: dict[str, float] = {}
    steady_seconds: dict[str, float] = {}
    window_times: list[float] = []

    async def sample_steady() -> None:
        """CPU of each process while every operation streams (after the ramp, before the
        first answers end), where the whole-run figure would dilute it; with the CPU seconds
        (utime + stime) over the same span, for the CPU per chunk below."""
        span = tokens / 50 - ramp_seconds - 1.0
        if span < 1.0:
            return
        await asyncio.sleep(ramp_seconds + 0.5)
        for p in processes.values():
            p.cpu_percent(None)
        before = {name: cpu_seconds(p) for name, p in processes.items()}
        window_times.append(time.monotonic())
        await asyncio.sleep(span)
        window_times.append(time.monotonic())
        steady_seconds.update({n: cpu_seconds(p) - before[n] for n, p in processes.items()})
        steady_cpu.update({name: p.cpu_percent(None) for name, p in processes.items()})

    try:
        async with _control(fake) as session:
            await _script(session, [{"kind": "text", "tokens": tokens}] * operations)
        for p in processes.values():
            p.cpu_percent(None)
        began = time.monotonic()
        sampler = asyncio.create_task(sample_steady())
        await asyncio.gather(*(one(i) for i in range(operations)))
        wall = time.monotonic() - began
        cpu = {name: p.cpu_percent(None) for name, p in processes.items()}
        await sampler
    finally:
        for channel in channels:
            await channel.close(grace=None)
    window = (max(s[0] for s in spans), min(s[1] for s in spans)) if spans else (0.0, 0.0)
    steady = [lat for sent, lat in samples if window[0] <= sent <= window[1]]
    every = [lat for _, lat in samples]
    per_chunk: dict[str, Any] = {}
    if len(window_times) == 2:
        # Chunks the fake sent during the CPU span: every process handles each of them once.
        chunks = sum(1 for sent, _ in samples if window_times[0] <= sent <= window_times[1])
        per_chunk = cpu_per_chunk(steady_seconds, chunks, window_times[1] - window_times[0])
    return {
        "operations": operations,
        "tokens_per_operation": tokens,
        "completed": completed,
        "tokens_received": sum(received),
        "tokens_expected": operations * tokens,
        "steady_window_seconds": max(0.0, window[1] - window[0]),
        "steady": _token_summary(steady) if len(steady) >= 100 else None,
        "all": _token_summary(every),
        "wall_seconds": wall,
        "cpu_percent": cpu,
        "steady_cpu_percent": steady_cpu,
        "cpu_per_chunk": per_chunk,
        "cpu_pressure": cpu_pressure(),
    }


def _passes(run: dict[str, Any]) -> bool:
    figures = run["steady"] or run["all"]
    return bool(
        run["completed"] == run["operations"]
        and run["tokens_received"] == run["tokens_expected"]
        and figures["within_100ms"] >= 0.95
    )


async def llm_capacity(
    stack: Stack,
    fake: FakeLLMProcess,
    loads: list[int],
    tokens: int,
    profile_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Step the number of concurrent `llm` operations up until fewer than 95 % of tokens arrive
    within 100 ms of the model sending them; the largest passing load is the capacity. The
    failing load is then run again under py-spy (runtime and gateway) to see what limits it."""
    runs: list[dict[str, Any]] = []
    largest = 0
    failing: int | None = None
    for n in loads:
        run = await token_load(stack, fake, n, tokens, ramp_seconds=min(5.0, n / 100))
        run["passed"] = _passes(run)
        runs.append(run)
        figures = run["steady"] or run["all"]
        per_chunk = {k: round(v) for k, v in run["cpu_per_chunk"].get("us_per_chunk", {}).items()}
        log(
            f"   llm_capacity {n}: within 100 ms {figures['within_100ms']:.3f}, "
            f"p99 {figures['p99']:.0f} ms, cpu {run['cpu_percent']}, "
            f"us/chunk {per_chunk}, passed {run['passed']}, pressure {run['cpu_pressure']}"
        )
        if not run["passed"]:
            failing = n
            break
        largest = n
    out: dict[str, Any] = {"largest_passing": largest, "failing": failing, "runs": runs}
    if failing is not None and profile_dir is not None:
        out["profile"] = await _profiled(stack, fake, failing, tokens, profile_dir)
    return out


async def _profiled(
    stack: Stack, fake: FakeLLMProcess, n: int, tokens: int, out: Path
) -> dict[str, Any]:
    """Rerun a load with `py-spy record` (raw collapsed stacks) on the runtime and the gateway;
    summarise each as the functions most often on CPU (own time) and on the stack (total)."""
    import shutil

    beside = Path(sys.executable).parent / "py-spy"  # a venv's, when it is not on PATH
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    ramp = min(5.0, n / 100)
    seconds = max(5, int(tokens / 50 - 2))
    procs = {"runtime": stack.runtimes[0].process.pid, "gateway": stack.gateways[0].process.pid}
    spies = {}
    load = asyncio.create_task(token_load(stack, fake, n, tokens, ramp_seconds=ramp))
    await asyncio.sleep(ramp)
    for name, pid in procs.items():
        spies[name] = await asyncio.create_subprocess_exec(
            spy, "record", "-d", str(seconds), "-r", "100", "--gil", "-p", str(pid),
            "--format", "raw",
            "-o", str(out / f"{name}-{n}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    result: dict[str, Any] = {"operations": n, "seconds": seconds}
    for name, proc in spies.items():
        _, err = await proc.communicate()
        path = out / f"{name}-{n}.txt"
        result[name] = (
            top_frames(path) if path.exists() else {"error": err.decode(errors="replace")[-500:]}
        )
    result["run"] = await load
    return result


async def suite(
    backend: str,
    workdir: Path,
    quick: bool,
    only: frozenset[str] = frozenset(SCENARIOS),
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Issue 13's figures, each beside the same run's ticker stop-to-halt (1-second steps) on
    the same stack. The llm capacity steps up only on SQLite (its target's backend)."""
    # The runtime's --llm-http-transport comes from this variable when set (an old/new run).
    transport = os.environ.get("STOPLINE_LLM_HTTP_TRANSPORT", LLMSettings().http_transport)
    out: dict[str, Any] = {"llm_http_transport": transport}
    fake = FakeLLMProcess()
    try:
        llm_args = fake.runtime_args()
        with Stack(backend, workdir, runtime_args=llm_args) as stack:
            out["ticker_stop/1s"] = await scenarios.stop_latency(stack, 1.0, 5 if quick else 30)
            if "llm_stop" in only:
                out["llm_stop"] = await llm_stop(stack, fake, 5 if quick else 30)
            if "tool_stop" in only:
                out["tool_stop"] = await tool_stop(stack, fake, 3 if quick else 20)
            if "token_latency" in only:
                out["token_latency"] = await token_load(
                    stack, fake, 1, 100 if quick else 500, ramp_seconds=0
                )
        if "token_latency" in only:
            # The same with the delta coalescing window off: what the 50 ms window costs.
            no_window = (*llm_args, "--delta-flush-seconds", "0")
            with Stack(backend, workdir, runtime_args=no_window) as stack:
                out["token_latency_no_window"] = await token_load(
                    stack, fake, 1, 100 if quick else 500, ramp_seconds=0
                )
        if "llm_capacity" in only and backend == "sqlite":
            loads = [5, 10] if quick else [50, 75, 100, 150, 200, 300, 400, 500, 600, 800]
            with Stack(backend, workdir, runtime_args=llm_args) as stack:
                # One short operation first: the runtime imports the openai SDK and its HTTP
                # client on the first `llm` step (about a second of CPU), a start-up cost that
                # would otherwise land in the first load's steady window.
                await token_load(stack, fake, 1, 10, ramp_seconds=0)
                out["llm_capacity"] = await llm_capacity(
                    stack,
                    fake,
                    loads,
                    tokens=100 if quick else 500,
                    profile_dir=profile_dir,
                )
    finally:
        fake.close()
    return out
