"""Runtime settings. The CLI fills these from flags and STOPLINE_* environment variables."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from stopline.limits import (
    DEFAULT_MAX_INPUT_BYTES,
    DEFAULT_MAX_PAGE_SIZE,
    DEFAULT_MAX_REQUEST_BYTES,
)
from stopline.transport import DEFAULT_RUNTIME_ADDRESS, ServerTLS

DEFAULT_DATABASE_URL = "sqlite:///.stopline/runtime.db"
# How long and how much token deltas (StepContext.delta) are buffered before they are written as
# one event. A model streams 50-100 tokens a second: 50 ms makes a transaction per 3-5 tokens
# while a reader sees no lag.
DEFAULT_DELTA_FLUSH_SECONDS = 0.05
DEFAULT_DELTA_FLUSH_CHARS = 1024
# The caps on an operation's deadline and step budget (a start may ask for less).
DEFAULT_MAX_DEADLINE_SECONDS = 24 * 3600.0
DEFAULT_MAX_STEPS_CAP = 100_000
# Retention: the events and step records of operations that ended longer ago than this are
# deleted (0 keeps everything), in batches of this many rows, looked for this often.
DEFAULT_EVENT_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_RETENTION_BATCH_SIZE = 500
DEFAULT_RETENTION_INTERVAL_SECONDS = 60.0
# The built-in python tool's cap on its time limit.
DEFAULT_PYTHON_TOOL_MAX_SECONDS = 60.0

# Where the `llm` agent's API key comes from, first one set wins. Read from the environment only
# (never a flag, which `ps` would show); kept out of input, state and events.
LLM_API_KEY_ENV = ("STOPLINE_LLM_API_KEY", "OPENAI_API_KEY")


def llm_api_key_from(environ: Mapping[str, str]) -> str | None:
    """The `llm` agent's API key: the first of LLM_API_KEY_ENV that is set and not empty."""
    return next((environ[name] for name in LLM_API_KEY_ENV if environ.get(name)), None)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_retention(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s`, `1w`, a bare number of seconds, or `0` (keep everything), as
    seconds. ValueError names what is accepted."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; use a number with s, m, h, d or w (e.g. 7d, 12h), "
            "or 0 to keep every event"
        )
    number, unit = match.groups()
    return float(number) * _UNITS[unit or "s"]


def shown_duration(seconds: float) -> str:
    """A retention as an operator would write it (the inverse of parse_retention, roughly)."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def default_runner_id() -> str:
    """Unique per process, readable in step records: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LLMSettings:
    """How the built-in `llm` agent reaches its model provider (any OpenAI-compatible server)."""

    base_url: str = "https://api.openai.com/v1"
    # Used when an operation's input names no model.
    model: str = "gpt-4o-mini"
    # Retries of a 429, a 5xx or a failed connection, with the SDK's backoff (honouring the
    # provider's retry-after); then the step fails naming the status.
    max_retries: int = 2
    api_key: str | None = field(default=None, repr=False)
    # The HTTP client under the SDK: "aiohttp" (the SDK's `DefaultAioHttpClient`), which reads
    # each streamed chunk for about half the CPU of "httpx2", the SDK's own default, kept as the
    # fallback (BENCHMARKS.md, issue 13).
    http_transport: str = "aiohttp"


@dataclass(frozen=True)
class RuntimeConfig:
    address: str = DEFAULT_RUNTIME_ADDRESS
    # host:port of the Prometheus metrics endpoint; None: not served.
    metrics_address: str | None = None
    # host:port at which a gateway reaches this replica itself (not through a load balancer).
    # Set, the replica names itself to the gateway on the streams of the operations it runs, and
    # the gateway sends those operations' release and stops straight here; None: not named.
    advertise_address: str | None = None
    database_url: str = DEFAULT_DATABASE_URL
    # Largest accepted agent input, measured as its compact JSON encoding.
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    # gRPC's receive limit (raised to twice max_input_bytes if that is larger); bigger requests
    # are refused by gRPC with RESOURCE_EXHAUSTED before they are parsed.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # How long a SQLite write waits for a lock another process holds before the call answers
    # UNAVAILABLE; every queued database call waits behind it, so keep it short.
    db_busy_timeout_seconds: float = 10.0
    # How long a cancelled step may take to clean up before the stop is recorded anyway.
    stop_grace_seconds: float = 1.0
    # How long in-flight RPCs get to finish on SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = 5.0
    default_page_size: int = 50
    max_page_size: int = DEFAULT_MAX_PAGE_SIZE
    # Watchers re-read storage after this much quiet, as a fallback to in-process notification.
    watch_poll_seconds: float = 5.0
    # Operations this process runs at once; more stay PENDING until a slot frees up.
    max_running: int = 1000
    # A runner owns each operation it runs for this long, renewing it every third of it; a dead
    # replica's operations are taken over this long after it died.
    lease_seconds: float = 10.0
    # How long a stop sent by idempotency key before its start waits for that start (the
    # tombstone's life): a start with the key within it is created already INTERRUPTED.
    stop_tombstone_seconds: float = 600.0
    # How long an input request a step makes stays open when the agent sets no expiry of its own
    # (then it takes its default: deny, unless the agent said otherwise).
    input_expiry_seconds: float = 86400.0
    # Claimable work and stored stop intents are re-checked at least this often (notifications
    # usually wake the runner much sooner on PostgreSQL).
    poll_seconds: float = 1.0
    # Limits of an operation (StartOperationRequest.deadline / max_steps): applied when a start
    # sets none (None: no limit), and the most a start may ask for (more is INVALID_ARGUMENT).
    default_deadline_seconds: float | None = None
    max_deadline_seconds: float = DEFAULT_MAX_DEADLINE_SECONDS
    default_max_steps: int | None = None
    max_steps_cap: int = DEFAULT_MAX_STEPS_CAP
    # Retention (runtime_service/retention.py): events and step records of operations that ended
    # longer ago than this are deleted, the operation rows kept; 0 keeps everything.
    event_retention_seconds: float = DEFAULT_EVENT_RETENTION_SECONDS
    retention_batch_size: int = DEFAULT_RETENTION_BATCH_SIZE
    retention_interval_seconds: float = DEFAULT_RETENTION_INTERVAL_SECONDS
    # Cancel the step in flight on a stop (False: stop at the next step boundary only).
    abort_mid_step: bool = True
    # Extra agents, each "name=package.module:attr".
    agents: tuple[str, ...] = ()
    # Extra tools, each "name=package.module:attr".
    tools: tuple[str, ...] = ()
    # Token deltas (StepContext.delta) are written as one event per this long or this many chars.
    delta_flush_seconds: float = DEFAULT_DELTA_FLUSH_SECONDS
    delta_flush_chars: int = DEFAULT_DELTA_FLUSH_CHARS
    # Warm worker processes for blocking tools, started with the first blocking call.
    worker_pool_size: int = 1
    # Most blocking calls run at once (more wait for a worker).
    max_workers: int = 8
    # The built-in python tool's time limit cap (a call may ask for less).
    python_tool_max_seconds: float = DEFAULT_PYTHON_TOOL_MAX_SECONDS
    # The built-in `llm` agent's provider.
    llm: LLMSettings = field(default_factory=LLMSettings)
    runner_id: str = field(default_factory=default_runner_id)
    # Apply Alembic migrations at start-up.
    migrate: bool = True
    # Callers must send one of these as a bearer token (the shared service credential)...
    service_tokens: tuple[str, ...] = ()
    # ...and/or connect over TLS; with tls.client_ca_file they must present a client certificate.
    tls: ServerTLS | None = None
    # Serve callers with neither credential nor client certificate. Development only.
    allow_any_caller: bool = False
    reflection: bool = True
