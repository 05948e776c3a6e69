"""Issue 15's figure: operations WAITING for a person hold no runner slot and little memory.

One runtime process with `--max-running 10`. In the same run:
1. baseline: 10 ticker operations with 10 ms steps run alone for a window (their step rate);
   they are then stopped;
2. `n` operations that ask at their first step (bench.agents:AskAgent) are started; each runs
   one step through the 10 slots and then WAITS. The runtime's RSS is read before and after
   (the delta / n is the memory per waiting operation: an upper bound, since it includes
   whatever the allocator kept from creating them);
3. 10 new ticker operations are started: with every slot free they all run (slots held by the
   waiting ones: 10 - the running count), and their step rate over the same window is compared
   with the baseline's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.load_scenarios import _count, _steps_completed
from bench.scenarios import Clients, _input
from bench.stack import Stack
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt

MAX_RUNNING = 10
RUNTIME_ARGS = ("--agent", "ask=bench.agents:AskAgent", "--max-running", str(MAX_RUNNING))
TICK = {"steps": 1_000_000, "step_seconds": 0.01, "chunk_interval_seconds": 1}


async def _until(probe: Any, within: float) -> None:
    deadline = time.perf_counter() + within
    while not await probe():
        if time.perf_counter() > deadline:
            raise AssertionError("the bench's operations never got there")
        await asyncio.sleep(0.2)


async def _step_rate(stack: Stack, window: float) -> float:
    before = await _steps_completed(stack)
    await asyncio.sleep(window)
    return (await _steps_completed(stack) - before) / window


async def waiting_capacity(stack: Stack, n: int, window_seconds: float = 10.0) -> dict[str, Any]:
    import psutil  # bench extra only

    clients = Clients(stack)
    runtime = clients.runtimes[0]
    proc = psutil.Process(stack.runtimes[0].process.pid)

    async def tickers() -> list[str]:
        ids = []
        for _ in range(MAX_RUNNING):
            started = await runtime.StartOperation(
                rt.StartOperationRequest(agent="ticker", input=_input(**TICK))
            )
            ids.append(started.operation.id)

        async def all_running() -> bool:
            return await _count(runtime, op_pb.OPERATION_STATUS_RUNNING) >= MAX_RUNNING

        await _until(all_running, 30)
        return ids

    try:
        first = await tickers()
        baseline = await _step_rate(stack, window_seconds)
        for op_id in first:
            await runtime.InterruptOperation(
                rt.InterruptOperationRequest(operation_id=op_id, requested_by="bench")
            )

        async def none_running() -> bool:
            return await _count(runtime, op_pb.OPERATION_STATUS_RUNNING) == 0

        await _until(none_running, 30)
        rss_before = proc.memory_info().rss
        sem = asyncio.Semaphore(50)

        async def ask_one() -> None:
            async with sem:
                await runtime.StartOperation(rt.StartOperationRequest(agent="ask"))

        began = time.perf_counter()
        await asyncio.gather(*(ask_one() for _ in range(n)))

        async def all_waiting() -> bool:
            return await _count(runtime, op_pb.OPERATION_STATUS_WAITING) >= n

        await _until(all_waiting, 600)
        to_waiting = time.perf_counter() - began
        rss_after = proc.memory_info().rss
        await tickers()
        running = await _count(runtime, op_pb.OPERATION_STATUS_RUNNING)
        waiting = await _count(runtime, op_pb.OPERATION_STATUS_WAITING)
        proc.cpu_percent(None)
        with_waiting = await _step_rate(stack, window_seconds)
        cpu = proc.cpu_percent(None)
    finally:
        await clients.close()
    return {
        "max_running": MAX_RUNNING,
        "waiting": waiting,
        "running_beside_them": running,
        "slots_used_by_waiting": MAX_RUNNING - running,
        "seconds_to_all_waiting": to_waiting,
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
        "bytes_per_waiting_operation": (rss_after - rss_before) / n,
        "steps_per_second_asked": MAX_RUNNING / TICK["step_seconds"],
        "steps_per_second_alone": baseline,
        "steps_per_second_beside_waiting": with_waiting,
        "ratio": with_waiting / baseline if baseline else None,
        "cpu_percent_beside_waiting": cpu,
    }
