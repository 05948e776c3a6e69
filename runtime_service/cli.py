"""`stopline runtime ...`: serve the runtime, migrate its database, and talk to it directly."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import click

from runtime_service.client import ClientError, RuntimeClient
from runtime_service.config import (
    LLM_API_KEY_ENV,
    LLMSettings,
    RuntimeConfig,
    llm_api_key_from,
    parse_retention,
    shown_duration,
)
from stopline import logs, tracing
from stopline.cli_security import (
    reflection_option,
    server_tls,
    server_tls_options,
    service_token_file_option,
    service_tokens,
)
from stopline.logs import log_format_option
from stopline.metrics import metrics_address_option
from stopline.render import (
    EXIT_BY_TERMINAL_EVENT,
    LIST_LIMIT,
    STATUS_FILTERS,
    describe_event,
    describe_operation,
    status_name,
    status_value,
    to_json,
)
from stopline.transport import RUNTIME_ADDRESS_ENV

_DEFAULTS = RuntimeConfig()


def _retention(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """--event-retention as seconds: a duration such as 7d or 12h (see parse_retention)."""
    try:
        return parse_retention(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


@click.group("runtime")
def runtime() -> None:
    """The runtime service: owns operations, runs their steps, stops them."""


def _database_option(fn: Any) -> Any:
    return click.option(
        "--database-url",
        envvar="STOPLINE_DATABASE_URL",
        default=_DEFAULTS.database_url,
        show_default=True,
        help="SQLAlchemy URL: sqlite:///path.db (default) or postgresql+psycopg://...",
    )(fn)


@runtime.command()
@click.option(
    "--address",
    envvar=RUNTIME_ADDRESS_ENV,
    default=_DEFAULTS.address,
    show_default=True,
    help="host:port to listen on.",
)
@_database_option
@click.option(
    "--max-input-bytes",
    envvar="STOPLINE_MAX_INPUT_BYTES",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_input_bytes,
    show_default=True,
    help="Largest agent input accepted (compact JSON).",
)
@click.option(
    "--max-request-bytes",
    envvar="STOPLINE_MAX_REQUEST_BYTES",
    type=click.IntRange(min=1024),
    default=_DEFAULTS.max_request_bytes,
    show_default=True,
    help="gRPC receive limit (raised to twice --max-input-bytes if larger).",
)
@click.option(
    "--db-busy-timeout",
    envvar="STOPLINE_DB_BUSY_TIMEOUT_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.db_busy_timeout_seconds,
    show_default=True,
    help="Seconds a SQLite write waits for another process's lock before answering UNAVAILABLE.",
)
@click.option(
    "--stop-grace",
    envvar="STOPLINE_STOP_GRACE_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.stop_grace_seconds,
    show_default=True,
    help="Seconds a cancelled step may take to clean up.",
)
@click.option(
    "--shutdown-grace",
    envvar="STOPLINE_SHUTDOWN_GRACE_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.shutdown_grace_seconds,
    show_default=True,
    help="Seconds in-flight RPCs get on SIGTERM.",
)
@click.option(
    "--max-running",
    envvar="STOPLINE_MAX_RUNNING",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_running,
    show_default=True,
    help="Operations run at once; more wait PENDING.",
)
@click.option(
    "--lease-seconds",
    envvar="STOPLINE_LEASE_SECONDS",
    type=click.FloatRange(min=0.1),
    default=_DEFAULTS.lease_seconds,
    show_default=True,
    help="How long a replica owns an operation between renewals (takeover delay after a crash).",
)
@click.option(
    "--stop-tombstone-seconds",
    envvar="STOPLINE_STOP_TOMBSTONE_SECONDS",
    type=click.FloatRange(min=0.0, min_open=True),
    default=_DEFAULTS.stop_tombstone_seconds,
    show_default=True,
    help="How long a stop sent by idempotency key before its start stays waiting for that start.",
)
@click.option(
    "--input-expiry-seconds",
    envvar="STOPLINE_INPUT_EXPIRY_SECONDS",
    type=click.FloatRange(min=0.0, min_open=True),
    default=_DEFAULTS.input_expiry_seconds,
    show_default=True,
    help="How long an input request stays open when its agent sets no expiry (then it takes its "
    "default: deny unless the agent said otherwise).",
)
@click.option(
    "--poll-seconds",
    envvar="STOPLINE_POLL_SECONDS",
    type=click.FloatRange(min=0.01),
    default=_DEFAULTS.poll_seconds,
    show_default=True,
    help="Fallback interval for claiming work and re-reading stop intents.",
)
@click.option(
    "--default-deadline",
    envvar="STOPLINE_DEFAULT_DEADLINE_SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Deadline in seconds (wall time from start) of an operation whose start sets none. "
    "[default: none]",
)
@click.option(
    "--max-deadline",
    envvar="STOPLINE_MAX_DEADLINE_SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.max_deadline_seconds,
    show_default=True,
    help="Largest deadline in seconds a start may set.",
)
@click.option(
    "--default-max-steps",
    envvar="STOPLINE_DEFAULT_MAX_STEPS",
    type=click.IntRange(min=1),
    default=None,
    help="Step budget of an operation whose start sets none. [default: none]",
)
@click.option(
    "--max-steps-cap",
    envvar="STOPLINE_MAX_STEPS_CAP",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_steps_cap,
    show_default=True,
    help="Largest step budget a start may set.",
)
@click.option(
    "--abort-mid-step/--stop-at-boundary",
    envvar="STOPLINE_ABORT_MID_STEP",
    default=_DEFAULTS.abort_mid_step,
    show_default=True,
    help="Cancel the step in flight on a stop, or let it finish and stop at the next boundary.",
)
@click.option(
    "--event-retention",
    envvar="STOPLINE_EVENT_RETENTION",
    metavar="DURATION",
    callback=_retention,
    default=shown_duration(_DEFAULTS.event_retention_seconds),
    show_default=True,
    help="Delete the events and step records of operations that ended longer ago than this "
    "(e.g. 7d, 12h, 30m); their status, result and cause stay. 0 keeps everything.",
)
@click.option(
    "--retention-batch-size",
    envvar="STOPLINE_RETENTION_BATCH_SIZE",
    type=click.IntRange(min=1),
    default=_DEFAULTS.retention_batch_size,
    show_default=True,
    help="Rows retention deletes per transaction (small: running operations' writes go "
    "between batches).",
)
@click.option(
    "--max-page-size",
    envvar="STOPLINE_MAX_PAGE_SIZE",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_page_size,
    show_default=True,
    help="Largest page ListOperations serves.",
)
@click.option(
    "--agent",
    "agents",
    multiple=True,
    envvar="STOPLINE_AGENTS",
    help="Extra agent as name=package.module:attr (repeatable; env: space-separated).",
)
@click.option(
    "--tool",
    "tools",
    multiple=True,
    envvar="STOPLINE_TOOLS",
    help="Extra tool as name=package.module:attr (repeatable; env: space-separated).",
)
@click.option(
    "--delta-flush-seconds",
    envvar="STOPLINE_DELTA_FLUSH_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.delta_flush_seconds,
    show_default=True,
    help="Token deltas are buffered this long before they are written as one event.",
)
@click.option(
    "--delta-flush-chars",
    envvar="STOPLINE_DELTA_FLUSH_CHARS",
    type=click.IntRange(min=1),
    default=_DEFAULTS.delta_flush_chars,
    show_default=True,
    help="...or until they hold this many characters.",
)
@click.option(
    "--worker-pool-size",
    envvar="STOPLINE_WORKER_POOL_SIZE",
    type=click.IntRange(min=0),
    default=_DEFAULTS.worker_pool_size,
    show_default=True,
    help="Warm worker processes for blocking tools (started with the first blocking call).",
)
@click.option(
    "--python-tool-max-seconds",
    envvar="STOPLINE_PYTHON_TOOL_MAX_SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.python_tool_max_seconds,
    show_default=True,
    help="Cap on the built-in python tool's time limit.",
)
@click.option(
    "--llm-base-url",
    envvar=["STOPLINE_LLM_BASE_URL", "OPENAI_BASE_URL"],
    default=_DEFAULTS.llm.base_url,
    show_default=True,
    help="The llm agent's OpenAI-compatible API (env: STOPLINE_LLM_BASE_URL or OPENAI_BASE_URL). "
    f"Its API key comes from the environment only: {' or '.join(LLM_API_KEY_ENV)}.",
)
@click.option(
    "--llm-model",
    envvar="STOPLINE_LLM_MODEL",
    default=_DEFAULTS.llm.model,
    show_default=True,
    help="The llm agent's model when an operation's input names none.",
)
@click.option(
    "--llm-max-retries",
    envvar="STOPLINE_LLM_MAX_RETRIES",
    type=click.IntRange(min=0),
    default=_DEFAULTS.llm.max_retries,
    show_default=True,
    help="Retries (with backoff) of a model call answered 429 or 5xx, or whose connection failed.",
)
@click.option(
    "--llm-http-transport",
    envvar="STOPLINE_LLM_HTTP_TRANSPORT",
    type=click.Choice(["aiohttp", "httpx2"]),
    default=_DEFAULTS.llm.http_transport,
    show_default=True,
    help="The HTTP client under the openai SDK: aiohttp (the SDK's DefaultAioHttpClient, less "
    "CPU per streamed token) or httpx2 (the SDK's own default).",
)
@service_token_file_option
@server_tls_options("STOPLINE_RUNTIME")
@click.option(
    "--insecure-allow-any-caller",
    is_flag=True,
    envvar="STOPLINE_INSECURE_ALLOW_ANY_CALLER",
    help="DEVELOPMENT ONLY: serve callers without the service credential or a client "
    "certificate. Anyone who can connect could then start, read and stop every operation.",
)
@reflection_option
@metrics_address_option
@click.option("--log-level", envvar="STOPLINE_LOG_LEVEL", default="INFO", show_default=True)
@log_format_option
def serve(
    address: str,
    database_url: str,
    max_input_bytes: int,
    max_request_bytes: int,
    db_busy_timeout: float,
    stop_grace: float,
    shutdown_grace: float,
    max_running: int,
    lease_seconds: float,
    stop_tombstone_seconds: float,
    input_expiry_seconds: float,
    poll_seconds: float,
    default_deadline: float | None,
    max_deadline: float,
    default_max_steps: int | None,
    max_steps_cap: int,
    abort_mid_step: bool,
    event_retention: float,
    retention_batch_size: int,
    max_page_size: int,
    agents: tuple[str, ...],
    tools: tuple[str, ...],
    delta_flush_seconds: float,
    delta_flush_chars: int,
    worker_pool_size: int,
    python_tool_max_seconds: float,
    llm_base_url: str,
    llm_model: str,
    llm_max_retries: int,
    llm_http_transport: str,
    service_token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    insecure_allow_any_caller: bool,
    reflection: bool,
    metrics_address: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Serve RuntimeService (with health and reflection) until SIGTERM/SIGINT.

    Only trusted callers are served: those sending the service credential and/or presenting a
    client certificate (mutual TLS). Without either it refuses to start."""
    from sqlalchemy.exc import SQLAlchemyError

    from runtime_service.agents.registry import AgentLoadError
    from runtime_service.server import serve as serve_runtime
    from runtime_service.tools import ToolLoadError
    from runtime_service.trust import TrustConfigError
    from stopline.errors import Unavailable

    if default_deadline is not None and default_deadline > max_deadline:
        raise click.BadParameter("is above --max-deadline", param_hint="--default-deadline")
    if default_max_steps is not None and default_max_steps > max_steps_cap:
        raise click.BadParameter("is above --max-steps-cap", param_hint="--default-max-steps")
    logs.configure(log_level, log_format)
    try:
        tracing.configure_from_env(
            "stopline-runtime", export_process=True
        )  # off unless OTEL_* variables say otherwise
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    config = RuntimeConfig(
        address=address,
        metrics_address=metrics_address,
        database_url=database_url,
        max_input_bytes=max_input_bytes,
        max_request_bytes=max_request_bytes,
        db_busy_timeout_seconds=db_busy_timeout,
        stop_grace_seconds=stop_grace,
        shutdown_grace_seconds=shutdown_grace,
        max_running=max_running,
        lease_seconds=lease_seconds,
        stop_tombstone_seconds=stop_tombstone_seconds,
        input_expiry_seconds=input_expiry_seconds,
        poll_seconds=poll_seconds,
        default_deadline_seconds=default_deadline,
        max_deadline_seconds=max_deadline,
        default_max_steps=default_max_steps,
        max_steps_cap=max_steps_cap,
        abort_mid_step=abort_mid_step,
        event_retention_seconds=event_retention,
        retention_batch_size=retention_batch_size,
        max_page_size=max_page_size,
        agents=agents,
        tools=tools,
        delta_flush_seconds=delta_flush_seconds,
        delta_flush_chars=delta_flush_chars,
        worker_pool_size=worker_pool_size,
        max_workers=max(_DEFAULTS.max_workers, worker_pool_size),
        python_tool_max_seconds=python_tool_max_seconds,
        llm=LLMSettings(
            base_url=llm_base_url,
            model=llm_model,
            max_retries=llm_max_retries,
            http_transport=llm_http_transport,
            api_key=llm_api_key_from(os.environ),
        ),
        service_tokens=service_tokens(service_token_file),
        tls=server_tls(tls_cert, tls_key, tls_client_ca),
        allow_any_caller=insecure_allow_any_caller,
        reflection=reflection,
    )
    try:
        try:
            asyncio.run(serve_runtime(config))
        finally:
            tracing.shutdown()  # export the spans still buffered
    except (
        AgentLoadError,
        ToolLoadError,
        OSError,
        SQLAlchemyError,
        TrustConfigError,
        Unavailable,
    ) as exc:
        # Unavailable: the storage could not reach the database at start-up (SQLAlchemyError:
        # the migrations could not).
        raise click.ClickException(str(exc)) from exc


@runtime.command()
@_database_option
def migrate(database_url: str) -> None:
    """Apply database migrations up to the newest schema (serve also does this at start)."""
    from runtime_service.database import create_db_engine
    from runtime_service.migrate import upgrade_to_head

    upgrade_to_head(create_db_engine(database_url))
    click.echo("database is at the newest schema")


# --------------------------------------------------------------------------- client commands

_target = click.option(
    "--runtime",
    "address",
    envvar=RUNTIME_ADDRESS_ENV,
    default=_DEFAULTS.address,
    show_default=True,
    help="Runtime address.",
)
_json_flag = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output, one JSON object per line."
)


def _client(address: str) -> RuntimeClient:
    return RuntimeClient.connect(address)


def _fail(exc: ClientError) -> None:
    raise click.ClickException(str(exc))


@runtime.command()
@_target
@_json_flag
@click.argument("agent")
@click.option("--input", "input_json", default="{}", help="Agent input as a JSON object.")
@click.option("--idempotency-key", default="")
@click.option("--watch/--no-watch", default=True, help="Stream events until the operation ends.")
def start(
    address: str, as_json: bool, agent: str, input_json: str, idempotency_key: str, watch: bool
) -> None:
    """Start an operation of AGENT (and by default stream its events)."""
    try:
        input_value = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    if not isinstance(input_value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    client = _client(address)
    try:
        response = client.start(agent, input_value, idempotency_key)
    except ClientError as exc:
        _fail(exc)
        return
    operation = response.operation
    click.echo(to_json(operation) if as_json else f"operation {operation.id}")
    if watch:
        _stream(client, operation.id, 0, as_json)


def _stream(client: RuntimeClient, operation_id: str, after_seq: int, as_json: bool) -> None:
    try:
        for event in client.watch(operation_id, after_seq):
            click.echo(to_json(event) if as_json else describe_event(event))
        final = client.get(operation_id)
    except ClientError as exc:
        _fail(exc)
        return
    sys.exit(EXIT_BY_TERMINAL_EVENT.get(status_name(final.status).lower(), 0))


@runtime.command()
@_target
@_json_flag
@click.argument("operation_id")
@click.option(
    "--after",
    "after_seq",
    type=int,
    default=0,
    show_default=True,
    help="Stream events after this seq.",
)
def watch(address: str, as_json: bool, operation_id: str, after_seq: int) -> None:
    """Stream an operation's events from --after until it ends."""
    _stream(_client(address), operation_id, after_seq, as_json)


@runtime.command()
@_target
@_json_flag
@click.argument("operation_id")
@click.option("--reason", default="stopped from the command line")
@click.option("--by", "requested_by", default="stopline-cli")
def stop(address: str, as_json: bool, operation_id: str, reason: str, requested_by: str) -> None:
    """Stop an operation (idempotent; says whether this call stopped it)."""
    try:
        response = _client(address).interrupt(operation_id, requested_by, reason)
    except ClientError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(to_json(response))
        return
    outcome = {1: "stop accepted", 2: "a stop was already requested", 3: "already finished"}
    said = outcome.get(response.outcome, "unknown outcome")
    click.echo(f"{said}: {status_name(response.operation.status)}")


@runtime.command()
@_target
@_json_flag
@click.argument("operation_id")
def get(address: str, as_json: bool, operation_id: str) -> None:
    """Show one operation."""
    try:
        operation = _client(address).get(operation_id)
    except ClientError as exc:
        _fail(exc)
        return
    click.echo(to_json(operation) if as_json else describe_operation(operation))


@runtime.command("ls")
@_target
@_json_flag
@click.option("--status", type=click.Choice(STATUS_FILTERS), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=LIST_LIMIT, show_default=True)
def list_operations(address: str, as_json: bool, status: str | None, limit: int) -> None:
    """List operations, newest first."""
    try:
        response = _client(address).list(status_value(status or ""), limit)
    except ClientError as exc:
        _fail(exc)
        return
    for operation in response.operations:
        click.echo(to_json(operation) if as_json else describe_operation(operation))
