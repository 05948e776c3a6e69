"""Stopline's throughput and load scenarios (streaming replay, many operations at once,
capacity), measured from a client process; the latency scenarios are in scenarios.py."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from bench.scenarios import Clients, _input, _is_terminal, _start
from bench.stack import Stack
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from stopline.transport import open_channel
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt
from tests.credentials import TOKEN, WithToken


async def prepare_events(stack: Stack, steps: int = 500, chunks: int = 8) -> tuple[str, int]:
    """A finished operation with steps * (chunks + 2) + 3 stored events, to replay."""
    clients = Clients(stack)
    try:
        last = 0
        op_id = ""
        async for update in clients.gateways[0].StartAndStream(
            _start("noop", steps=steps, chunks=chunks)
        ):
            if update.WhichOneof("update") == "accepted":
                op_id = update.accepted.operation_id
            elif update.WhichOneof("update") == "event":
                last = update.event.seq
                if _is_terminal(update):
                    break
        return op_id, last
    finally:
        await clients.close()


async def stream_rate(address: str, op_id: str, streams: int) -> dict[str, Any]:
    """Events per second delivered to `streams` concurrent clients replaying one operation."""
    channels = [open_channel(address) for _ in range(min(streams, 10))]
    stubs = [WithToken(gw_grpc.GatewayServiceStub(c), TOKEN) for c in channels]

    async def one(i: int) -> int:
        count = 0
        async for _ in stubs[i % len(stubs)].StreamOperation(
            gw.StreamOperationRequest(operation_id=op_id, after_seq=0)
        ):
            count += 1
        return count

    try:
        began = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        elapsed = time.perf_counter() - began
    finally:
        for channel in channels:
            await channel.close(grace=None)
    return {
        "streams": streams,
        "events": sum(counts),
        "seconds": elapsed,
        "events_per_second": sum(counts) / elapsed,
    }


async def concurrency(
    stack: Stack, n: int = 200, steps: int = 20, step_seconds: float = 0.01, seed: int = 2
) -> dict[str, Any]:
    """n operations at once, half stopped at random times: wall time and final-state check.

    An operation must end interrupted exactly when a stop was recorded on it. A stop answered
    `delivered` says so itself (ALREADY_FINISHED: it came after the end); one still pending
    when its acknowledgment was due (this scenario overloads the machine: 200 streams of 300
    events a second each) is looked up once everything has ended, as its delivery went on."""
    rng = random.Random(seed)
    clients = Clients(stack)
    outcome: dict[str, int] = {}
    stopped: set[str] = set()
    pending: set[str] = set()

    async def one(i: int) -> None:
        stub = clients.gateways[i % len(clients.gateways)]
        call = stub.StartAndStream(
            _start(
                "ticker",
                steps=steps,
                step_seconds=step_seconds,
                chunk_interval_seconds=step_seconds,
            )
        )
        updates = aiter(call)
        op_id = (await anext(updates)).accepted.operation_id
        stop_at = rng.uniform(0, steps * step_seconds) if i % 2 == 0 else None
        stopper = None
        if stop_at is not None:

            async def stop_later() -> None:
                await asyncio.sleep(stop_at)
                reply = await stub.StopOperation(gw.StopOperationRequest(operation_id=op_id))
                if reply.delivery != gw.STOP_DELIVERY_DELIVERED:
                    pending.add(op_id)
                elif reply.outcome != rt.INTERRUPT_OUTCOME_ALREADY_FINISHED:
                    stopped.add(op_id)

            stopper = asyncio.create_task(stop_later())
        async for update in updates:
            if _is_terminal(update):
                outcome[op_id] = update.event.WhichOneof("kind") == "interrupted"
                break
        if stopper is not None:
            await stopper

    try:
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - began
        for op_id in pending:
            got = await clients.gateways[0].GetOperation(gw.GetOperationRequest(operation_id=op_id))
            if got.operation.HasField("stop_request"):
                stopped.add(op_id)
    finally:
        await clients.close()
    wrong = sum(1 for op_id, interrupted in outcome.items() if interrupted != (op_id in stopped))
    return {
        "operations": n,
        "wall_seconds": wall,
        "stopped": len(stopped),
        # Stops not yet answered by the runtime when their acknowledgment was due.
        "acknowledged_pending": len(pending),
        "wrong_final_state": wrong,
        "missing": n - len(outcome),
    }


async def concurrency_repeated(stack: Stack, repetitions: int) -> dict[str, Any]:
    """The concurrency scenario several times on one stack (different random stops each time):
    a single wall time on this VM moves by ±20 % between runs, so the median is reported."""
    runs = [await concurrency(stack, seed=2 + i) for i in range(repetitions)]
    walls = [run["wall_seconds"] for run in runs]
    return {
        "repetitions": repetitions,
        "wall_seconds": statistics.median(walls),
        "wall_seconds_each": walls,
        "stopped": runs[0]["stopped"],
        "acknowledged_pending": sum(run.get("acknowledged_pending", 0) for run in runs),
        "wrong_final_state": sum(run["wrong_final_state"] for run in runs),
        "missing": sum(run["missing"] for run in runs),
        "runs": runs,
    }


async def start_tickers(
    runtime: Any, n: int, wait_seconds: float, poll_seconds: float
) -> tuple[float, int, float]:
    """Start n `ticker` operations of 1-second steps (one chunk a step, practically endless)
    straight on the runtime, 50 calls at a time, then wait (polled, at most `wait_seconds`) until
    all of them run: a start returns once the operation is stored, and its runner claims it
    right after. The seconds the starts took, how many run, and the seconds until they did."""
    sem = asyncio.Semaphore(50)

    async def start_one() -> None:
        async with sem:
            await runtime.StartOperation(
                rt.StartOperationRequest(
                    agent="ticker",
                    input=_input(steps=100_000, step_seconds=1, chunk_interval_seconds=1),
                )
            )

    began = time.perf_counter()
    await asyncio.gather(*(start_one() for _ in range(n)))
    started = time.perf_counter() - began
    deadline = time.perf_counter() + wait_seconds
    while True:
        running = await _count(runtime, op_pb.OPERATION_STATUS_RUNNING)
        if running >= n or time.perf_counter() > deadline:
            break
        await asyncio.sleep(poll_seconds)
    return started, running, time.perf_counter() - began


async def capacity(stack: Stack, n: int, window_seconds: float = 10.0) -> dict[str, Any]:
    """How many ticker operations with 1-second steps one runtime process keeps running, and
    whether it keeps up: the step rate achieved over a window against the n per second asked for.
    (The stack and its database are thrown away afterwards, so nothing is stopped one by one.)"""
    import psutil  # bench extra only

    clients = Clients(stack)
    runtime = clients.runtimes[0]
    proc = psutil.Process(stack.runtimes[0].process.pid)
    try:
        start_seconds, running, all_running_seconds = await start_tickers(runtime, n, 10.0, 0.1)
        before = await _steps_completed(stack)
        proc.cpu_percent(None)
        await asyncio.sleep(window_seconds)
        cpu = proc.cpu_percent(None)
        after = await _steps_completed(stack)
        rss_mb = proc.memory_info().rss / 2**20
    finally:
        await clients.close()
    return {
        "started": n,
        "running": running,
        "start_seconds": start_seconds,
        "all_running_seconds": all_running_seconds,
        "steps_per_second_asked": n,
        "steps_per_second_achieved": (after - before) / window_seconds,
        "rss_mb": rss_mb,
        "cpu_percent": cpu,
    }


async def _count(runtime: Any, status: op_pb.OperationStatus.ValueType) -> int:
    total, token = 0, ""
    while True:
        page = await runtime.ListOperations(
            rt.ListOperationsRequest(status=status, page_size=500, page_token=token)
        )
        total += len(page.operations)
        token = page.next_page_token
        if not token:
            return total


async def _steps_completed(stack: Stack) -> int:
    from sqlalchemy import create_engine, func, select

    from runtime_service.schema import steps

    def count() -> int:
        engine = create_engine(stack.url)
        try:
            with engine.connect() as conn:
                done = steps.c.outcome == "completed"
                query = select(func.count()).select_from(steps).where(done)
                return int(conn.execute(query).scalar_one())
        finally:
            engine.dispose()

    return await asyncio.to_thread(count)
