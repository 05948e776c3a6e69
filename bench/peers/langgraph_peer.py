"""The LangGraph Agent Server peer: how fast, and how completely, a cancel stops a streaming run.

Stopline's claim is that a stop lands in milliseconds whatever the step is doing. The LangGraph
Agent Server is the peer a user would otherwise reach for, so this module measures the same thing
on it, in the same run and on the same machine: a client streams a run of sequential async steps
that sleep for the step length, the test cancels it (``runs.cancel``, action ``interrupt``) at a
random moment inside a step, and we record

* how long the cancel call takes to return,
* how long after the cancel call the client's stream ends, and whether it ended with a terminal
  event (``end``/``error``) or simply closed,
* whether the step in flight was cut (the graph recorded ``cancelled``, or never recorded its
  finish) or ran to completion, and whether any later step started.

A second scenario cancels as soon as the client holds the run id and checks that no step started.

The server is ``langgraph dev`` from ``langgraph-cli[inmem]``, run locally and offline (see
``OFFLINE_ENV`` and ``DEV_FLAGS``). It lives in a virtualenv of its own because langgraph-api pins
grpcio and protobuf below the versions Stopline requires; ``ensure_server_env`` creates that
virtualenv from ``langgraph_app/server-requirements.txt`` on first use. The graph it serves is
``langgraph_app/sleeper_graph.py``; each step appends start/finish/cancelled records with wall-clock
times to a per-trial trace file, which is how the client side tells whether a step was cut.

Run a small version and print JSON with ``python -m bench.peers.langgraph_peer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent / "langgraph_app"
SERVER_REQUIREMENTS = APP_DIR / "server-requirements.txt"
GRAPH_ID = "sleeper"

# Environment for the dev server. The first three switch off everything that would reach the network
# on start: the CLI's usage analytics (langgraph_cli/analytics.py), the API server's PyPI version
# check (langgraph_api/cli.py, "dev-only" and undocumented), and LangSmith tracing. The in-memory
# server needs no license key: its metadata loop logs "No license key ... skipping" and returns.
OFFLINE_ENV: dict[str, str] = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    "LANGGRAPH_NO_VERSION_CHECK": "true",
    "LANGSMITH_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
    "PYTHONUNBUFFERED": "1",
}
# Variables that would make the server talk to LangSmith or an OTLP collector; dropped from the
# inherited environment so a developer's shell cannot turn the benchmark into a networked one.
_SCRUBBED_ENV = (
    "LANGSMITH_API_KEY",
    "LANGCHAIN_API_KEY",
    "LANGGRAPH_CLOUD_LICENSE_KEY",
    "LANGSMITH_CONTROL_PLANE_API_KEY",
    "LANGSMITH_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "VIRTUAL_ENV",
)
# --no-browser: never try to open Studio. --no-reload: no file watcher, so the measured server is a
# plain single uvicorn process. The blocking-call detector stays on (no --allow-blocking): the graph
# is written not to trip it, so the server runs as a user's dev server would.
DEV_FLAGS: tuple[str, ...] = ("--no-browser", "--no-reload", "--server-log-level", "warning")

_STREAM_MODES = ["updates", "tasks"]  # "tasks" tells the client when each step starts
_STARTUP_DEADLINE_S = 90.0
_TERMINAL_RUN_STATES = {"success", "error", "interrupted", "timeout"}


# --------------------------------------------------------------------------------------------------
# The server's own environment and process
# --------------------------------------------------------------------------------------------------


def _default_server_env_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "stopline-bench" / "langgraph-server-venv"


def ensure_server_env(env_dir: Path | None = None) -> Path:
    """Return the ``bin`` directory of a virtualenv holding the pinned LangGraph dev server.

    Why a separate virtualenv: langgraph-api requires grpcio<1.82 and protobuf<7, Stopline
    requires grpcio>=1.85 and protobuf>=7.35.1, so installing the server next to Stopline would
    break one or the other. The virtualenv is built once (``STOPLINE_BENCH_LANGGRAPH_VENV`` or a
    per-user cache directory) and rebuilt when ``server-requirements.txt`` changes; only PyPI is
    needed.
    """
    env_dir = env_dir or Path(
        os.environ.get("STOPLINE_BENCH_LANGGRAPH_VENV") or _default_server_env_dir()
    )
    bin_dir = env_dir / "bin"
    stamp = env_dir / ".stopline-requirements.sha256"
    wanted = hashlib.sha256(SERVER_REQUIREMENTS.read_bytes()).hexdigest()
    if (bin_dir / "langgraph").exists() and stamp.exists() and stamp.read_text() == wanted:
        return bin_dir
    if not (bin_dir / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    subprocess.run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(SERVER_REQUIREMENTS),
        ],
        check=True,
    )
    stamp.write_text(wanted)
    return bin_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ok", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _server_versions(bin_dir: Path) -> dict[str, str]:
    probe = (
        "import importlib.metadata as m, json, platform\n"
        "names = ['langgraph-api', 'langgraph-cli', 'langgraph-runtime-inmem', 'langgraph',"
        " 'langgraph-checkpoint', 'uvicorn']\n"
        "out = {n: m.version(n) for n in names}\n"
        "out['python'] = platform.python_version()\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(bin_dir / "python"), "-c", probe], check=True, capture_output=True, text=True
    )
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


@dataclass
class LangGraphServer:
    """A running ``langgraph dev`` process and where to find its URL, log and trace files."""

    url: str
    port: int
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    versions: dict[str, str] = field(default_factory=dict)

    def trace_path(self, tag: str) -> Path:
        """Per-trial file the graph appends its step records to."""
        return self.workdir / f"trace-{tag}.jsonl"

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5.0)


@contextlib.contextmanager
def langgraph_server(keep_workdir: bool = False) -> Iterator[LangGraphServer]:
    """Run ``langgraph dev`` offline on a free 127.0.0.1 port for the duration of the block.

    Why this shape: the benchmark must not depend on anything outside the machine, must not leave
    a server behind, and must not write into the repository. So the app directory is copied to a
    temporary working directory (the dev server creates ``.langgraph_api/`` in its working
    directory), the server starts in its own process group with analytics, version check, tracing,
    browser and reload switched off, we poll ``/ok`` until it answers (or fail with its log), and on
    exit the whole process group is terminated (SIGTERM, then SIGKILL after a grace period).
    """
    bin_dir = ensure_server_env()
    versions = _server_versions(bin_dir)
    workdir = Path(tempfile.mkdtemp(prefix="stopline-langgraph-"))
    for name in ("langgraph.json", "sleeper_graph.py"):
        shutil.copy2(APP_DIR / name, workdir / name)
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(OFFLINE_ENV)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    log_path = workdir / "server.log"
    server: LangGraphServer | None = None
    try:
        for _attempt in range(3):  # the free port can be taken between probing and binding
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [
                        str(bin_dir / "langgraph"),
                        "dev",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--config",
                        "langgraph.json",
                        *DEV_FLAGS,
                    ],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            candidate = LangGraphServer(url, port, workdir, log_path, proc, versions)
            deadline = time.monotonic() + _STARTUP_DEADLINE_S
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(url):
                    server = candidate
                    break
                time.sleep(0.1)
            if server is not None:
                break
            _stop_process_group(proc)
            if "address already in use" not in candidate.log_tail().lower():
                raise RuntimeError(
                    f"langgraph dev did not answer on {url}/ok within {_STARTUP_DEADLINE_S:.0f} s "
                    f"(exit code {proc.returncode}); its output:\n{candidate.log_tail()}"
                )
        if server is None:
            raise RuntimeError("langgraph dev could not bind a free port in 3 attempts")
        yield server
    finally:
        if server is not None:
            _stop_process_group(server.process)
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _server_or(server: LangGraphServer | None) -> Iterator[LangGraphServer]:
    if server is not None:
        yield server
    else:
        with langgraph_server() as started:
            yield started


# --------------------------------------------------------------------------------------------------
# Client side helpers
# --------------------------------------------------------------------------------------------------


def client_versions() -> dict[str, str]:
    """Versions on the client side of the measurement (this process)."""
    out = {n: importlib.metadata.version(n) for n in ("langgraph-sdk", "httpx")}
    out["python"] = sys.version.split()[0]
    return out


def summarize(samples: list[float]) -> dict[str, float | int | None]:
    """Median and p99 (nearest rank; with fewer than 100 samples p99 is close to the max)."""
    if not samples:
        return {"n": 0, "median": None, "p99": None, "min": None, "max": None}
    ordered = sorted(samples)
    rank = max(1, math.ceil(0.99 * len(ordered)))
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 3),
        "p99": round(ordered[rank - 1], 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def _read_trace(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class _HttpWatcher:
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


def _make_client(url: str, timer: _HttpWatcher) -> Any:
    from langgraph_sdk import get_client

    client = get_client(url=url)
    http = client.http.client
    hooks = http.event_hooks
    http.event_hooks = {
        "request": [*hooks.get("request", []), timer.request_hook()],
        "response": [*hooks.get("response", []), timer.hook()],
    }
    return client


async def _wait_terminal(client: Any, thread_id: str, run_id: str, deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    status = "unknown"
    while time.monotonic() < deadline:
        run = await client.runs.get(thread_id, run_id)
        status = str(run["status"])
        if status in _TERMINAL_RUN_STATES:
            return status
        await asyncio.sleep(0.05)
    return status


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


# --------------------------------------------------------------------------------------------------
# Scenario 1: cancel at a random moment inside a step while the client streams
# --------------------------------------------------------------------------------------------------


async def _cancel_trial(
    client: Any,
    timer: _HttpWatcher,
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
            for rec in _read_trace(trace):
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
            stream_mode=_STREAM_MODES,
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
        status = await _wait_terminal(client, thread_id, run_id, step_seconds * steps + 10.0)

    records = _read_trace(trace)
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
            node["cut_after_cancel_ms"] = _ms(marks["cancelled"] - cancel_wall)  # type: ignore[operator]
        else:
            node["outcome"] = "cut_without_cancelled_error"
        node["ran_ms_before_cancel"] = _ms(cancel_wall - marks["start"])  # type: ignore[operator]
    later_steps = [
        {
            "step": index,
            "started_after_cancel_ms": _ms(marks["start"] - cancel_wall),
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
        "aimed_offset_ms": _ms(offset),
        "cancel_return_ms": _ms(
            None if cancel_t0 is None or cancel_t1 is None else cancel_t1 - cancel_t0
        ),
        "stream_end_ms": _ms(None if cancel_t0 is None else stream_end - cancel_t0),
        "http_body_closed_ms": _ms(
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
        "run_start_ms": _ms(None if first_start is None else first_start - request_wall),
    }


async def acancel_while_streaming(
    step_seconds: float, trials: int, *, server: LangGraphServer, seed: int | None = None
) -> dict[str, Any]:
    """Async form of :func:`cancel_while_streaming` against an already running server."""
    rng = random.Random(seed)
    timer = _HttpWatcher()
    client = _make_client(server.url, timer)
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
            **summarize(column("cancel_return_ms", samples)),
            "samples": column("cancel_return_ms", samples),
        },
        "stream_end_ms": {
            **summarize(column("stream_end_ms", samples)),
            "samples": column("stream_end_ms", samples),
        },
        "http_body_closed_ms": {
            **summarize(column("http_body_closed_ms", samples)),
            "samples": column("http_body_closed_ms", samples),
        },
        "node_cut_after_cancel_ms": {**summarize(cut_ms), "samples": cut_ms},
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
    with _server_or(server) as srv:
        return asyncio.run(acancel_while_streaming(step_seconds, trials, server=srv, seed=seed))


# --------------------------------------------------------------------------------------------------
# Scenario 2: cancel as soon as the run id is known
# --------------------------------------------------------------------------------------------------


async def acancel_right_after_start(trials: int, *, server: LangGraphServer) -> dict[str, Any]:
    """Async form of :func:`cancel_right_after_start` against an already running server."""
    timer = _HttpWatcher()
    client = _make_client(server.url, timer)
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
                stream_mode=_STREAM_MODES,
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
            status = await _wait_terminal(client, thread_id, state["run_id"], 5.0)
        t0 = state.get("t0")
        rows.append(
            {
                "tag": tag,
                "trace": trace,
                "run_id_known_ms_after_request": _ms(state["known_at"] - request_t)
                if "known_at" in state
                else None,
                "cancel_return_ms": _ms(state["t1"] - t0) if t0 is not None else None,
                "stream_end_ms": _ms(stream_end - t0) if t0 is not None else None,
                "http_body_closed_ms": _ms(timer.closed_at - t0)
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
        records = _read_trace(row.pop("trace"))
        row["steps_started"] = sum(1 for r in records if r["event"] == "start")

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None]

    return {
        "peer": "langgraph-agent-server (langgraph dev, in-memory)",
        "scenario": "cancel_right_after_start",
        "trials": trials,
        "cancel_return_ms": {
            **summarize(column("cancel_return_ms")),
            "samples": column("cancel_return_ms"),
        },
        "stream_end_ms": {**summarize(column("stream_end_ms")), "samples": column("stream_end_ms")},
        "http_body_closed_ms": {
            **summarize(column("http_body_closed_ms")),
            "samples": column("http_body_closed_ms"),
        },
        "run_id_known_ms_after_request": {
            **summarize(column("run_id_known_ms_after_request")),
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
    with _server_or(server) as srv:
        return asyncio.run(acancel_right_after_start(trials, server=srv))


# --------------------------------------------------------------------------------------------------
# Reference: what an uncancelled stream looks like at its end
# --------------------------------------------------------------------------------------------------


async def astream_to_completion(trials: int, *, server: LangGraphServer) -> dict[str, Any]:
    """Async form of :func:`stream_to_completion`."""
    timer = _HttpWatcher()
    client = _make_client(server.url, timer)
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
            stream_mode=_STREAM_MODES,
        ):
            names.append(str(part.event))
        end_wall = time.time()
        records = _read_trace(server.trace_path(tag))
        last_finish = max((float(r["t"]) for r in records if r["event"] == "finish"), default=None)
        rows.append(
            {
                "events": names,
                "last_event": names[-1] if names else None,
                "stream_end_after_last_step_ms": _ms(
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
    with _server_or(server) as srv:
        return asyncio.run(astream_to_completion(trials, server=srv))


def run_all(quick: bool = False) -> dict[str, Any]:
    """Every LangGraph scenario on one server (what `python -m bench.run` records)."""
    trials = (5, 3, 1, 5) if quick else (20, 8, 2, 10)
    started = time.monotonic()
    with langgraph_server() as server:
        stream_to_completion(2, server=server)  # warm-up: first-run imports and graph loading
        result: dict[str, Any] = {
            "peer": "langgraph-agent-server",
            "how": {
                "command": [
                    "langgraph",
                    "dev",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "<free port>",
                    "--config",
                    "langgraph.json",
                    *DEV_FLAGS,
                ],
                "env": OFFLINE_ENV,
                "scrubbed_env": list(_SCRUBBED_ENV),
                "stream_mode": _STREAM_MODES,
                "cancel": "client.runs.cancel(thread_id, run_id, action='interrupt')",
            },
            "versions": {"server": server.versions, "client": client_versions()},
            "reference_stream_to_completion": stream_to_completion(3, server=server),
            "cancel_while_streaming": [
                cancel_while_streaming(0.01, trials[0], server=server, seed=1),
                cancel_while_streaming(1.0, trials[1], server=server, seed=2),
                cancel_while_streaming(30.0, trials[2], server=server, seed=3),
            ],
            "cancel_right_after_start": cancel_right_after_start(trials[3], server=server),
        }
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    """Run every LangGraph scenario on one server and print JSON."""
    json.dump(run_all(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
