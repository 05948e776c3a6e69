"""LangGraph peer, scenario 2 (cancel as soon as the run id is known) and the reference run."""

from __future__ import annotations

import asyncio
import contextlib
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
# Scenario 2: cancel as soon as the run id is known
# --------------------------------------------------------------------------------------------------


async def acancel_right_after_start(trials: int, *, server: LangGraphServer) -> dict[str, Any]:
    """Async form of :func:`cancel_right_after_start` against an already running server."""
    timer = HttpWatcher()
    client = make_client(server.url, timer)
    rows: list[dict[str, Any]] = []
    for _ in range(trials):
        tag = uuid.uuid4().hex
        trace = server.trace_path(tag)
        thread_id = (await client.threads.create())["thread_id"]
        known = asyncio.Event()
        state: dict[str, Any] = {}
        events: list[tuple[float, str]] = []
        timer.reset()

        def on_created(
            meta: Any, state: dict[str, Any] = state, known: asyncio.Event = known
        ) -> None:
            state["run_id"] = str(meta["run_id"])
            state["known_at"] = time.perf_counter()
            known.set()

        async def cancel_when_known(
            state: dict[str, Any] = state, known: asyncio.Event = known, thread_id: str = thread_id
        ) -> None:
            await known.wait()
            state["cancel_wall"] = time.time()
            state["t0"] = time.perf_counter()
            try:
                await client.runs.cancel(thread_id, state["run_id"], action="interrupt")
            except Exception as exc:  # recorded, not hidden
                state["cancel_error"] = f"{type(exc).__name__}: {exc}"
            state["t1"] = time.perf_counter()

        canceller = asyncio.create_task(cancel_when_known())
        request_t = time.perf_counter()
        stream_error = None
        try:
            async for part in client.runs.stream(
                thread_id,
                GRAPH_ID,
                input={"steps": 3, "step_seconds": 0.2, "trace_path": str(trace), "tag": tag},
                stream_mode=STREAM_MODES,
                on_run_created=on_created,
            ):
                events.append((time.perf_counter(), str(part.event)))
        except Exception as exc:  # how the stream ends is part of the result
            stream_error = f"{type(exc).__name__}: {exc}"
        stream_end = time.perf_counter()
        if not known.is_set():
            canceller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await canceller
        status = "unknown"
        if "run_id" in state:
            status = await wait_terminal(client, thread_id, state["run_id"], 5.0)
        t0 = state.get("t0")
        rows.append(
            {
                "tag": tag,
                "trace": trace,
                "run_id_known_ms_after_request": to_ms(state["known_at"] - request_t)
                if "known_at" in state
                else None,
                "cancel_return_ms": to_ms(state["t1"] - t0) if t0 is not None else None,
                "stream_end_ms": to_ms(stream_end - t0) if t0 is not None else None,
                "http_body_closed_ms": to_ms(timer.closed_at - t0)
                if t0 is not None and timer.closed_at is not None
                else None,
                "events": [name for (_, name) in events],
                "requests_after_cancel_until_stream_end": []
                if t0 is None
                else timer.requests_between(t0, stream_end),
                "stream_error": stream_error,
                "cancel_error": state.get("cancel_error"),
                "run_status": status,
            }
        )
    # The in-memory queue picks pending runs up on a 0.5 s poll: wait past two polls before
    # concluding that a cancelled run never started a step.
    await asyncio.sleep(1.5)
    for row in rows:
        records = read_trace(row.pop("trace"))
        row["steps_started"] = sum(1 for r in records if r["event"] == "start")

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None]

    return {
        "peer": "langgraph-agent-server (langgraph dev, in-memory)",
        "scenario": "cancel_right_after_start",
        "trials": trials,
        "cancel_return_ms": {
            **summary_nearest_rank(column("cancel_return_ms")),
            "samples": column("cancel_return_ms"),
        },
        "stream_end_ms": {
            **summary_nearest_rank(column("stream_end_ms")),
            "samples": column("stream_end_ms"),
        },
        "http_body_closed_ms": {
            **summary_nearest_rank(column("http_body_closed_ms")),
            "samples": column("http_body_closed_ms"),
        },
        "run_id_known_ms_after_request": {
            **summary_nearest_rank(column("run_id_known_ms_after_request")),
            "samples": column("run_id_known_ms_after_request"),
        },
        "trials_where_a_step_started": sum(1 for r in rows if r["steps_started"]),
        "run_statuses": sorted({r["run_status"] for r in rows}),
        "per_trial": rows,
        "versions": {"server": server.versions, "client": client_versions()},
    }


def cancel_right_after_start(
    trials: int, *, server: LangGraphServer | None = None
) -> dict[str, Any]:
    """Start a streaming run and cancel it the moment the client holds its run id.

    Why: Stopline's target is that an early stop never lets a step start; this is the peer's figure
    for the same thing. The run id is taken from the stream response's headers (the SDK's
    ``on_run_created``), the earliest point a client can know it, and the cancel is sent at once.
    Reports the cancel call's return time, when the stream ended, what events arrived, the run's
    final status, and whether any step started (read from the graph's trace after waiting past the
    in-memory queue's poll interval). Starts its own server unless one is given.
    """
    with server_or(server) as srv:
        return asyncio.run(acancel_right_after_start(trials, server=srv))


# --------------------------------------------------------------------------------------------------
# Reference: what an uncancelled stream looks like at its end
# --------------------------------------------------------------------------------------------------


async def astream_to_completion(trials: int, *, server: LangGraphServer) -> dict[str, Any]:
    """Async form of :func:`stream_to_completion`."""
    timer = HttpWatcher()
    client = make_client(server.url, timer)
    rows: list[dict[str, Any]] = []
    for _ in range(trials):
        tag = uuid.uuid4().hex
        thread_id = (await client.threads.create())["thread_id"]
        names: list[str] = []
        async for part in client.runs.stream(
            thread_id,
            GRAPH_ID,
            input={
                "steps": 2,
                "step_seconds": 0.01,
                "trace_path": str(server.trace_path(tag)),
                "tag": tag,
            },
            stream_mode=STREAM_MODES,
        ):
            names.append(str(part.event))
        end_wall = time.time()
        records = read_trace(server.trace_path(tag))
        last_finish = max((float(r["t"]) for r in records if r["event"] == "finish"), default=None)
        rows.append(
            {
                "events": names,
                "last_event": names[-1] if names else None,
                "stream_end_after_last_step_ms": to_ms(
                    None if last_finish is None else end_wall - last_finish
                ),
            }
        )
    return {
        "scenario": "stream_to_completion",
        "trials": trials,
        "trials_with_end_event": sum(1 for r in rows if "end" in r["events"]),
        "per_trial": rows,
    }


def stream_to_completion(trials: int, *, server: LangGraphServer | None = None) -> dict[str, Any]:
    """Stream runs that are not cancelled and record how their streams end.

    Why: a reference for the cancel scenarios. If an uncancelled stream has no ``end`` event either,
    a client of this server cannot tell a finished run from a cancelled one by the stream alone.
    """
    with server_or(server) as srv:
        return asyncio.run(astream_to_completion(trials, server=srv))
