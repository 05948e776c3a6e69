"""A LangGraph graph of N sequential async steps, served by ``langgraph dev`` for the benchmark.

Each step sleeps ``step_seconds`` and then hands over to the next one until ``steps`` have run; both
numbers come from the run's input so one deployed graph serves every step length. Every step writes
one JSON line to ``trace_path`` when it starts and one when it either finishes its sleep or is
cancelled while sleeping. The benchmark reads that file to tell whether a cancel cut the step in
flight (a ``cancelled`` record, or no ``finish`` record) or let it run to its end.

The records are written with plain ``os.write`` on an ``O_APPEND`` descriptor: a single short write
per record, so records from concurrent runs never interleave and the record is on disk before the
step's next ``await`` (a write deferred to a thread could be lost to the very cancel it describes).
The descriptor is opened ``O_NONBLOCK``: Linux ignores that flag for regular files, and it tells the
dev server's blocking-call detector (blockbuster) that this few-microsecond append is not a stall,
so the server can keep that detector on instead of running with ``--allow-blocking``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph


class SleeperState(TypedDict, total=False):
    steps: int
    step_seconds: float
    trace_path: str
    tag: str
    done: int


def _record(state: SleeperState, step: int, event: str) -> None:
    path = state.get("trace_path")
    if not path:
        return
    line = json.dumps({"tag": state.get("tag", ""), "step": step, "event": event, "t": time.time()})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def step(state: SleeperState) -> dict[str, Any]:
    index = state.get("done", 0)
    _record(state, index, "start")
    try:
        await asyncio.sleep(float(state.get("step_seconds", 0.0)))
    except asyncio.CancelledError:
        _record(state, index, "cancelled")
        raise
    _record(state, index, "finish")
    return {"done": index + 1}


def _next(state: SleeperState) -> str:
    return "step" if state.get("done", 0) < int(state.get("steps", 1)) else END


_builder = StateGraph(SleeperState)
_builder.add_node("step", step)
_builder.add_edge(START, "step")
_builder.add_conditional_edges("step", _next, ["step", END])
graph = _builder.compile()
