"""`stopline runtime ...`: serve the runtime, migrate its database, and talk to it directly
(cli_client.py); the options are in cli_options.py."""

from __future__ import annotations

import asyncio
import os

import click

from runtime_service.cli_client import COMMANDS
from runtime_service.cli_options import DEFAULTS, database_option, serve_options
from runtime_service.config import LLMSettings, RuntimeConfig, llm_api_key_from
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


@click.group("runtime")
def runtime() -> None:
    """The runtime service: owns operations, runs their steps, stops them."""


@runtime.command()
@serve_options
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
    advertise_address: str | None,
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
        advertise_address=advertise_address,
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
        max_workers=max(DEFAULTS.max_workers, worker_pool_size),
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
@database_option
def migrate(database_url: str) -> None:
    """Apply database migrations up to the newest schema (serve also does this at start)."""
    from runtime_service.database import create_db_engine
    from runtime_service.migrate import upgrade_to_head

    upgrade_to_head(create_db_engine(database_url))
    click.echo("database is at the newest schema")


for command in COMMANDS:
    runtime.add_command(command)
