"""The LangGraph peer's server: its own virtualenv and a ``langgraph dev`` process, run offline.

The server lives in a virtualenv of its own because langgraph-api pins grpcio and protobuf below
the versions Stopline requires; :func:`ensure_server_env` creates that virtualenv from
``langgraph_app/server-requirements.txt`` on first use. :func:`langgraph_server` runs it on a free
127.0.0.1 port with everything that would reach the network switched off (``OFFLINE_ENV``,
``DEV_FLAGS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "langgraph_app"
SERVER_REQUIREMENTS = APP_DIR / "server-requirements.txt"

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
SCRUBBED_ENV = (
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

_STARTUP_DEADLINE_S = 90.0


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
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
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
def server_or(server: LangGraphServer | None) -> Iterator[LangGraphServer]:
    if server is not None:
        yield server
    else:
        with langgraph_server() as started:
            yield started
