"""The options of `stopline runtime ...`: each flag with its STOPLINE_* variable and its default
from RuntimeConfig. `serve` takes its parameters by these options' names (cli.py); the commands
that talk to a runtime directly take --runtime and --json (cli_client.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from runtime_service.config import LLM_API_KEY_ENV, RuntimeConfig, parse_retention, shown_duration
from stopline.transport import RUNTIME_ADDRESS_ENV, split_host_port

F = TypeVar("F", bound=Callable[..., Any])

DEFAULTS = RuntimeConfig()


def _retention(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """--event-retention as seconds: a duration such as 7d or 12h (see parse_retention)."""
    try:
        return parse_retention(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


database_option = click.option(
    "--database-url",
    envvar="STOPLINE_DATABASE_URL",
    default=DEFAULTS.database_url,
    show_default=True,
    help="SQLAlchemy URL: sqlite:///path.db (default) or postgresql+psycopg://...",
)

runtime_option = click.option(
    "--runtime",
    "address",
    envvar=RUNTIME_ADDRESS_ENV,
    default=DEFAULTS.address,
    show_default=True,
    help="Runtime address.",
)

# Hosts that say "every interface" to a listener and nothing to a caller.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _check_advertised(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An address a gateway can dial: host:port, the host a name or an interface's address."""
    if not value:
        return None
    try:
        host, port = split_host_port(value, "advertised address")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if port == 0 or host in _WILDCARD_HOSTS:
        raise click.BadParameter(
            f"{value!r} names every interface or any port, which a gateway cannot dial: give "
            "the host name or address and the port the gateway reaches this replica at"
        )
    return value


# The runtime's own options of `serve`, top to bottom as --help lists them.
_SERVE_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option(
        "--address",
        envvar=RUNTIME_ADDRESS_ENV,
        default=DEFAULTS.address,
        show_default=True,
        help="host:port to listen on.",
    ),
    click.option(
        "--advertise-address",
        envvar="STOPLINE_ADVERTISE_ADDRESS",
        default=None,
        metavar="HOST:PORT",
        callback=_check_advertised,
        help="host:port at which the gateway reaches this replica itself. Set on each of "
        "several replicas so that the gateway sends an operation's release and stops to the "
        "replica that runs it (unset: every call goes through the gateway's load balancing).",
    ),
    database_option,
    click.option(
        "--max-input-bytes",
        envvar="STOPLINE_MAX_INPUT_BYTES",
        type=click.IntRange(min=1),
        default=DEFAULTS.max_input_bytes,
        show_default=True,
        help="Largest agent input accepted (compact JSON).",
    ),
    click.option(
        "--max-request-bytes",
        envvar="STOPLINE_MAX_REQUEST_BYTES",
        type=click.IntRange(min=1024),
        default=DEFAULTS.max_request_bytes,
        show_default=True,
        help="gRPC receive limit (raised to twice --max-input-bytes if larger).",
    ),
    click.option(
        "--db-busy-timeout",
        envvar="STOPLINE_DB_BUSY_TIMEOUT_SECONDS",
        type=click.FloatRange(min=0),
        default=DEFAULTS.db_busy_timeout_seconds,
        show_default=True,
        help="Seconds a SQLite write waits for another process's lock before answering "
        "UNAVAILABLE.",
    ),
    click.option(
        "--stop-grace",
        envvar="STOPLINE_STOP_GRACE_SECONDS",
        type=click.FloatRange(min=0),
        default=DEFAULTS.stop_grace_seconds,
        show_default=True,
        help="Seconds a cancelled step may take to clean up.",
    ),
    click.option(
        "--shutdown-grace",
        envvar="STOPLINE_SHUTDOWN_GRACE_SECONDS",
        type=click.FloatRange(min=0),
        default=DEFAULTS.shutdown_grace_seconds,
        show_default=True,
        help="Seconds in-flight RPCs get on SIGTERM.",
    ),
    click.option(
        "--max-running",
        envvar="STOPLINE_MAX_RUNNING",
        type=click.IntRange(min=1),
        default=DEFAULTS.max_running,
        show_default=True,
        help="Operations run at once; more wait PENDING.",
    ),
    click.option(
        "--lease-seconds",
        envvar="STOPLINE_LEASE_SECONDS",
        type=click.FloatRange(min=0.1),
        default=DEFAULTS.lease_seconds,
        show_default=True,
        help="How long a replica owns an operation between renewals (takeover delay after a "
        "crash).",
    ),
    click.option(
        "--stop-tombstone-seconds",
        envvar="STOPLINE_STOP_TOMBSTONE_SECONDS",
        type=click.FloatRange(min=0.0, min_open=True),
        default=DEFAULTS.stop_tombstone_seconds,
        show_default=True,
        help="How long a stop sent by idempotency key before its start stays waiting for that "
        "start.",
    ),
    click.option(
        "--input-expiry-seconds",
        envvar="STOPLINE_INPUT_EXPIRY_SECONDS",
        type=click.FloatRange(min=0.0, min_open=True),
        default=DEFAULTS.input_expiry_seconds,
        show_default=True,
        help="How long an input request stays open when its agent sets no expiry (then it takes "
        "its default: deny unless the agent said otherwise).",
    ),
    click.option(
        "--poll-seconds",
        envvar="STOPLINE_POLL_SECONDS",
        type=click.FloatRange(min=0.01),
        default=DEFAULTS.poll_seconds,
        show_default=True,
        help="Fallback interval for claiming work and re-reading stop intents.",
    ),
    click.option(
        "--default-deadline",
        envvar="STOPLINE_DEFAULT_DEADLINE_SECONDS",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Deadline in seconds (wall time from start) of an operation whose start sets none. "
        "[default: none]",
    ),
    click.option(
        "--max-deadline",
        envvar="STOPLINE_MAX_DEADLINE_SECONDS",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULTS.max_deadline_seconds,
        show_default=True,
        help="Largest deadline in seconds a start may set.",
    ),
    click.option(
        "--default-max-steps",
        envvar="STOPLINE_DEFAULT_MAX_STEPS",
        type=click.IntRange(min=1),
        default=None,
        help="Step budget of an operation whose start sets none. [default: none]",
    ),
    click.option(
        "--max-steps-cap",
        envvar="STOPLINE_MAX_STEPS_CAP",
        type=click.IntRange(min=1),
        default=DEFAULTS.max_steps_cap,
        show_default=True,
        help="Largest step budget a start may set.",
    ),
    click.option(
        "--abort-mid-step/--stop-at-boundary",
        envvar="STOPLINE_ABORT_MID_STEP",
        default=DEFAULTS.abort_mid_step,
        show_default=True,
        help="Cancel the step in flight on a stop, or let it finish and stop at the next boundary.",
    ),
    click.option(
        "--event-retention",
        envvar="STOPLINE_EVENT_RETENTION",
        metavar="DURATION",
        callback=_retention,
        default=shown_duration(DEFAULTS.event_retention_seconds),
        show_default=True,
        help="Delete the events and step records of operations that ended longer ago than this "
        "(e.g. 7d, 12h, 30m); their status, result and cause stay. 0 keeps everything.",
    ),
    click.option(
        "--retention-batch-size",
        envvar="STOPLINE_RETENTION_BATCH_SIZE",
        type=click.IntRange(min=1),
        default=DEFAULTS.retention_batch_size,
        show_default=True,
        help="Rows retention deletes per transaction (small: running operations' writes go "
        "between batches).",
    ),
    click.option(
        "--max-page-size",
        envvar="STOPLINE_MAX_PAGE_SIZE",
        type=click.IntRange(min=1),
        default=DEFAULTS.max_page_size,
        show_default=True,
        help="Largest page ListOperations serves.",
    ),
    click.option(
        "--agent",
        "agents",
        multiple=True,
        envvar="STOPLINE_AGENTS",
        help="Extra agent as name=package.module:attr (repeatable; env: space-separated).",
    ),
    click.option(
        "--tool",
        "tools",
        multiple=True,
        envvar="STOPLINE_TOOLS",
        help="Extra tool as name=package.module:attr (repeatable; env: space-separated).",
    ),
    click.option(
        "--delta-flush-seconds",
        envvar="STOPLINE_DELTA_FLUSH_SECONDS",
        type=click.FloatRange(min=0),
        default=DEFAULTS.delta_flush_seconds,
        show_default=True,
        help="Token deltas are buffered this long before they are written as one event.",
    ),
    click.option(
        "--delta-flush-chars",
        envvar="STOPLINE_DELTA_FLUSH_CHARS",
        type=click.IntRange(min=1),
        default=DEFAULTS.delta_flush_chars,
        show_default=True,
        help="...or until they hold this many characters.",
    ),
    click.option(
        "--worker-pool-size",
        envvar="STOPLINE_WORKER_POOL_SIZE",
        type=click.IntRange(min=0),
        default=DEFAULTS.worker_pool_size,
        show_default=True,
        help="Warm worker processes for blocking tools (started with the first blocking call).",
    ),
    click.option(
        "--python-tool-max-seconds",
        envvar="STOPLINE_PYTHON_TOOL_MAX_SECONDS",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULTS.python_tool_max_seconds,
        show_default=True,
        help="Cap on the built-in python tool's time limit.",
    ),
    click.option(
        "--llm-base-url",
        envvar=["STOPLINE_LLM_BASE_URL", "OPENAI_BASE_URL"],
        default=DEFAULTS.llm.base_url,
        show_default=True,
        help="The llm agent's OpenAI-compatible API (env: STOPLINE_LLM_BASE_URL or "
        "OPENAI_BASE_URL). "
        f"Its API key comes from the environment only: {' or '.join(LLM_API_KEY_ENV)}.",
    ),
    click.option(
        "--llm-model",
        envvar="STOPLINE_LLM_MODEL",
        default=DEFAULTS.llm.model,
        show_default=True,
        help="The llm agent's model when an operation's input names none.",
    ),
    click.option(
        "--llm-max-retries",
        envvar="STOPLINE_LLM_MAX_RETRIES",
        type=click.IntRange(min=0),
        default=DEFAULTS.llm.max_retries,
        show_default=True,
        help="Retries (with backoff) of a model call answered 429 or 5xx, or whose connection "
        "failed.",
    ),
    click.option(
        "--llm-http-transport",
        envvar="STOPLINE_LLM_HTTP_TRANSPORT",
        type=click.Choice(["aiohttp", "httpx2"]),
        default=DEFAULTS.llm.http_transport,
        show_default=True,
        help="The HTTP client under the openai SDK: aiohttp (the SDK's DefaultAioHttpClient, less "
        "CPU per streamed token) or httpx2 (the SDK's own default).",
    ),
)


def serve_options(fn: F) -> F:
    """Every option of _SERVE_OPTIONS, as if stacked on `fn` in that order."""
    for option in reversed(_SERVE_OPTIONS):
        fn = option(fn)
    return fn
