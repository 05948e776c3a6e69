"""LangGraph peer, scenario 1: cancel a streaming run at a random moment inside a step."""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from typing import Any

from bench.peers.langgraph_client import (
    GRAPH_ID,
    STREAM_MODES,
    HttpWatcher,
    client_versions,
    make_client,
    read_trace,
    to_ms,
    wait_terminal,
)
from bench.peers.langgraph_server import LangGraphServer, server_or
from bench.stats import summary_nearest_rank

# --------------------------------------------------------------------------------------------------
# Scenario 1: cancel at a random moment inside a step while the client streams
# --------------------------------------------------------------------------------------------------


async def _cancel_trial(
    client: Any,
    timer: HttpWatcher,
    server: LangGraphServer,
    step_seconds: float,
    rng: random.Random,
) -> dict[str, Any]:
    # Which step to cancel in: not the first for short steps (so the run is well under way), the
    # first for long ones (a 30 s step costs 30 s per step waited for).
    target = 0 if step_seconds >= 5.0 else rng.randint(1, 2 if step_seconds >= 0.5 else 4)
    steps = target + 2  # there is always a next step that must not start
    offset = rng.uniform(0.1, 0.9) * step_seconds
    tag = uuid.uuid4().hex
    trace = server.trace_path(tag)
    thread_id = (await client.threads.create())["thread_id"]
    run_id: str | None = None
    cancel_wall: float | None = None
    cancel_t0: float | None = None
    cancel_t1: float | None = None
    cancel_error: str | None = None
    canceller: asyncio.Task[None] | None = None
    events: list[tuple[float, str]] = []
    stream_error: str | None = None
    starts_seen = 0
    timer.reset()

    def on_created(meta: Any) -> None:
        nonlocal run_id
        run_id = str(meta["run_id"])

    async def cancel_inside_target() -> None:
        nonlocal cancel_wall, cancel_t0, cancel_t1, cancel_error
        # The task event reaches us shortly after the step began; aim at the step's own start time.
        start_wall = None
        give_up = time.monotonic() + 2.0
        while start_wall is None and time.monotonic() < give_up:
            for rec in read_trace(trace):
                if rec["step"] == target and rec["event"] == "start":
                    start_wall = float(rec["t"])
            if start_wall is None:
                await asyncio.sleep(0.0005)
        aim = (start_wall if start_wall is not None else time.time()) + offset
        await asyncio.sleep(max(0.0, aim - time.time()))
        assert run_id is not None
        cancel_wall = time.time()
        cancel_t0 = time.perf_counter()
        try:
            await client.runs.cancel(thread_id, run_id, action="interrupt")
        except Exception as exc:  # recorded, not hidden
            cancel_error = f"{type(exc).__name__}: {exc}"
        cancel_t1 = time.perf_counter()

    request_wall = time.time()
    try:
        async for part in client.runs.stream(
            thread_id,
            GRAPH_ID,
            input={
                "steps": steps,
                "step_seconds": step_seconds,
                "trace_path": str(trace),
                "tag": tag,
            },
            stream_mode=STREAM_MODES,
            config={"recursion_limit": 2 * steps + 10},
            on_run_created=on_created,
        ):
            events.append((time.perf_counter(), str(part.event)))
            data = part.data
            if part.event == "tasks" and isinstance(data, dict) and "input" in data:
                starts_seen += 1
                if starts_seen == target + 1 and canceller is None:
                    canceller = asyncio.create_task(cancel_inside_target())
    except Exception as exc:  # how the stream ends is part of the result
        stream_error = f"{type(exc).__name__}: {exc}"
    stream_end = time.perf_counter()
    if canceller is not None:
        await canceller
    status = "unknown"
    if run_id is not None:
        status = await wait_terminal(client, thread_id, run_id, step_seconds * steps + 10.0)

    records = read_trace(trace)
    by_step: dict[int, dict[str, float]] = {}
    for rec in records:
        by_step.setdefault(int(rec["step"]), {})[str(rec["event"])] = float(rec["t"])
    in_flight = None
    if cancel_wall is not None:
        for index, marks in sorted(by_step.items()):
            ended = marks.get("finish")
            if marks.get("start", math.inf) <= cancel_wall and (
                ended is None or ended > cancel_wall
            ):
                in_flight = index
    node: dict[str, Any] = {"step": in_flight}
    if in_flight is None:
        node["outcome"] = "between_steps" if cancel_wall is not None else "not_cancelled"
    else:
        marks = by_step[in_flight]
        if "finish" in marks:
            node["outcome"] = "ran_to_completion"
        elif "cancelled" in marks:
            node["outcome"] = "cut"
            node["cut_after_cancel_ms"] = to_ms(marks["cancelled"] - cancel_wall)  # type: ignore[operator]
        else:
            node["outcome"] = "cut_without_cancelled_error"
        node["ran_ms_before_cancel"] = to_ms(cancel_wall - marks["start"])  # type: ignore[operator]
    later_steps = [
        {
            "step": index,
            "started_after_cancel_ms": to_ms(marks["start"] - cancel_wall),
            "outcome": "ran_to_completion"
            if "finish" in marks
            else "cut"
            if "cancelled" in marks
            else "cut_without_cancelled_error",
        }
        for index, marks in sorted(by_step.items())
        if cancel_wall is not None and marks.get("start", 0.0) > cancel_wall
    ]
    after = [name for (t, name) in events if cancel_t0 is not None and t >= cancel_t0]
    terminal = next((name for name in reversed(after) if name in ("end", "error")), None)
    first_start = by_step.get(0, {}).get("start")
    return {
        "step_seconds": step_seconds,
        "target_step": target,
        "aimed_offset_ms": to_ms(offset),
        "cancel_return_ms": to_ms(
            None if cancel_t0 is None or cancel_t1 is None else cancel_t1 - cancel_t0
        ),
        "stream_end_ms": to_ms(None if cancel_t0 is None else stream_end - cancel_t0),
        "http_body_closed_ms": to_ms(
            None if cancel_t0 is None or timer.closed_at is None else timer.closed_at - cancel_t0
        ),
        "events_after_cancel": after,
        "terminal_event": terminal,
        "stream_error": stream_error,
        "cancel_error": cancel_error,
        "node": node,
        "steps_started_after_cancel": later_steps,
        "requests_after_cancel_until_stream_end": []
        if cancel_t0 is None
        else timer.requests_between(cancel_t0, stream_end),
        "run_status": status,
        "run_start_ms": to_ms(None if first_start is None else first_start - request_wall),
    }


async def acancel_while_streaming(
    step_seconds: float, trials: int, *, server: LangGraphServer, seed: int | None = None
) -> dict[str, Any]:
    """Async form of :func:`cancel_while_streaming` against an already running server."""
    rng = random.Random(seed)
    timer = HttpWatcher()
    client = make_client(server.url, timer)
    samples = [await _cancel_trial(client, timer, server, step_seconds, rng) for _ in range(trials)]
    inside = [s for s in samples if s["node"]["outcome"] not in ("between_steps", "not_cancelled")]

    def column(key: str, rows: list[dict[str, Any]]) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None]

    outcomes: dict[str, int] = {}
    for s in samples:
        outcomes[s["node"]["outcome"]] = outcomes.get(s["node"]["outcome"], 0) + 1
    cut_ms = [
        float(s["node"]["cut_after_cancel_ms"])
        for s in samples
        if s["node"].get("cut_after_cancel_ms") is not None
    ]
    return {
        "peer": "langgraph-agent-server (langgraph dev, in-memory)",
        "scenario": "cancel_while_streaming",
        "step_seconds": step_seconds,
        "trials": trials,
        "cancel_return_ms": {
            **summary_nearest_rank(column("cancel_return_ms", samples)),
            "samples": column("cancel_return_ms", samples),
        },
        "stream_end_ms": {
            **summary_nearest_rank(column("stream_end_ms", samples)),
            "samples": column("stream_end_ms", samples),
        },
        "http_body_closed_ms": {
            **summary_nearest_rank(column("http_body_closed_ms", samples)),
            "samples": column("http_body_closed_ms", samples),
        },
        "node_cut_after_cancel_ms": {**summary_nearest_rank(cut_ms), "samples": cut_ms},
        "trials_with_cancel_inside_a_step": len(inside),
        "node_outcomes": outcomes,
        "trials_with_terminal_event": sum(1 for s in samples if s["terminal_event"]),
        "trials_with_stream_error": sum(1 for s in samples if s["stream_error"]),
        "trials_with_later_step_started": sum(
            1 for s in samples if s["steps_started_after_cancel"]
        ),
        "later_step_outcomes": [
            later["outcome"] for s in samples for later in s["steps_started_after_cancel"]
        ],
        "trials_where_sdk_reconnected_after_cancel": sum(
            1 for s in samples if "GET stream" in s["requests_after_cancel_until_stream_end"]
        ),
        "run_statuses": sorted({s["run_status"] for s in samples}),
        "per_trial": samples,
        "versions": {"server": server.versions, "client": client_versions()},
    }


def cancel_while_streaming(
    step_seconds: float,
    trials: int,
    *,
    server: LangGraphServer | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Cancel (action ``interrupt``) a streaming run at a random moment inside a step.

    Why: this is the peer's answer to Stopline's stop-to-halt scenario. Per trial the run has a few
    sequential steps of ``step_seconds``; once the client sees the target step start, the test waits
    a uniform 10-90 % of the step and calls ``runs.cancel``. Reported in milliseconds, raw samples
    plus median/p99: the cancel call's return time; the time from the cancel call until the SDK's
    stream iterator ends (and, underneath, until the HTTP body closed); whether any
    ``end``/``error`` event arrived or the stream just closed; whether the step in flight was cut
    (and how long after the cancel call the graph saw its ``CancelledError``) or ran to
    completion; whether a later step started, and what became of it; the run's final status.
    Trials whose cancel fell between two steps (possible with 10 ms steps) are counted as
    ``between_steps``, not passed off as cuts. Starts its own server unless one is given.
    """
    with server_or(server) as srv:
        return asyncio.run(acancel_while_streaming(step_seconds, trials, server=srv, seed=seed))
