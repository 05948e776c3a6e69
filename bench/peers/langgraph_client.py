"""The LangGraph peer's client side: the SDK client, an HTTP watcher under it, trace files.

Each step of ``langgraph_app/sleeper_graph.py`` appends start/finish/cancelled records with
wall-clock times to a per-trial trace file (:func:`read_trace`), which is how the client side tells
whether a step was cut; :class:`HttpWatcher` times the raw HTTP stream underneath the SDK.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

GRAPH_ID = "sleeper"
STREAM_MODES = ["updates", "tasks"]  # "tasks" tells the client when each step starts
TERMINAL_RUN_STATES = {"success", "error", "interrupted", "timeout"}


# --------------------------------------------------------------------------------------------------
# Client side helpers
# --------------------------------------------------------------------------------------------------


def client_versions() -> dict[str, str]:
    """Versions on the client side of the measurement (this process)."""
    out = {n: importlib.metadata.version(n) for n in ("langgraph-sdk", "httpx")}
    out["python"] = sys.version.split()[0]
    return out


def read_trace(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class HttpWatcher:
    """Notes, underneath the SDK, when a run stream's HTTP body ends and which requests are sent.

    The SDK's stream does not end when the server closes the body: with no ``end``/``error`` event
    it first asks the server for the run's status (to tell a finished run from a dropped
    connection), and if the run still looks active it reconnects to the stream. Timing the raw body
    and listing the requests shows how much of the client's wait is the server and how much is the
    SDK's own follow-up.
    """

    def __init__(self) -> None:
        self.closed_at: float | None = None
        self.requests: list[tuple[float, str]] = []

    def reset(self) -> None:
        self.closed_at = None
        self.requests = []

    def requests_between(self, since: float, until: float) -> list[str]:
        return [what for (t, what) in self.requests if since <= t <= until]

    def request_hook(self) -> Any:
        import httpx

        async def on_request(request: httpx.Request) -> None:
            path = request.url.path
            kind = (
                "cancel"
                if path.endswith("/cancel")
                else ("stream" if path.endswith("/stream") else "other")
            )
            self.requests.append((time.perf_counter(), f"{request.method} {kind}"))

        return on_request

    def hook(self) -> Any:
        import httpx

        timer = self

        class _Timed(httpx.AsyncByteStream):
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in self._inner:
                    yield chunk
                timer.closed_at = time.perf_counter()

            async def aclose(self) -> None:
                await self._inner.aclose()

        async def on_response(response: httpx.Response) -> None:
            if response.request.url.path.endswith("/stream"):
                response.stream = _Timed(response.stream)

        return on_response


def make_client(url: str, timer: HttpWatcher) -> Any:
    from langgraph_sdk import get_client

    client = get_client(url=url)
    http = client.http.client
    hooks = http.event_hooks
    http.event_hooks = {
        "request": [*hooks.get("request", []), timer.request_hook()],
        "response": [*hooks.get("response", []), timer.hook()],
    }
    return client


async def wait_terminal(client: Any, thread_id: str, run_id: str, deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    status = "unknown"
    while time.monotonic() < deadline:
        run = await client.runs.get(thread_id, run_id)
        status = str(run["status"])
        if status in TERMINAL_RUN_STATES:
            return status
        await asyncio.sleep(0.05)
    return status


def to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
