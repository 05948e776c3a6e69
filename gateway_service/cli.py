"""`stopline gateway ...`: serve the gateway in front of a runtime."""

from __future__ import annotations

import asyncio
import os

import click

from gateway_service.auth import AuthConfigError, AuthSettings, JwtSettings
from gateway_service.config import GatewayConfig
from gateway_service.keys import API_KEYS_ENV, KeyFileError, new_key
from gateway_service.runtime_link import LoadBalancing
from stopline import logs, tracing
from stopline.cli_security import (
    reflection_option,
    server_tls,
    server_tls_options,
    service_token_file_option,
    service_tokens,
)
from stopline.limits import MAX_HOLD_SECONDS
from stopline.logs import log_format_option
from stopline.metrics import metrics_address_option
from stopline.transport import GATEWAY_ADDRESS_ENV, RUNTIME_ADDRESS_ENV, ClientTLS

JWT_SECRET_ENV = "STOPLINE_JWT_HS256_SECRET"

_DEFAULTS = GatewayConfig()


@click.group("gateway")
def gateway() -> None:
    """The gateway service: start, stream, reconnect and stop operations for clients."""


@gateway.command()
@click.option(
    "--address",
    envvar=GATEWAY_ADDRESS_ENV,
    default=_DEFAULTS.address,
    show_default=True,
    help="host:port to listen on.",
)
@click.option(
    "--runtime",
    "runtime_address",
    envvar=RUNTIME_ADDRESS_ENV,
    default=_DEFAULTS.runtime_address,
    show_default=True,
    help="The runtime's host:port; several replicas: ipv4:HOST:PORT,HOST:PORT or dns:///NAME:PORT.",
)
@click.option(
    "--runtime-lb-policy",
    "runtime_load_balancing",
    envvar="STOPLINE_RUNTIME_LB_POLICY",
    type=click.Choice([p.value for p in LoadBalancing]),
    default=_DEFAULTS.runtime_load_balancing.value,
    show_default=True,
    help="How calls are spread over the runtime's addresses (gRPC load-balancing policy).",
)
@click.option(
    "--stop-ack-timeout",
    envvar="STOPLINE_STOP_ACK_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.stop_ack_seconds,
    show_default=True,
    help="Seconds StopOperation waits for the runtime before answering PENDING.",
)
@click.option(
    "--stop-delivery-deadline",
    envvar="STOPLINE_STOP_DELIVERY_DEADLINE_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.stop_delivery_deadline_seconds,
    show_default=True,
    help="Seconds a stop is retried while the runtime is unreachable before it is undelivered.",
)
@click.option(
    "--watch-reconnect-deadline",
    envvar="STOPLINE_WATCH_RECONNECT_DEADLINE_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.watch_reconnect_deadline_seconds,
    show_default=True,
    help="Seconds a stream keeps reconnecting to the runtime before it ends with UNAVAILABLE.",
)
@click.option(
    "--start-hold",
    envvar="STOPLINE_START_HOLD_SECONDS",
    # The runtime refuses longer holds, and a zero hold would let a stop sent during the start
    # arrive after the first step began.
    type=click.FloatRange(min=0, min_open=True, max=MAX_HOLD_SECONDS),
    default=_DEFAULTS.start_hold_seconds,
    show_default=True,
    help="Seconds the runtime holds a new operation unless the gateway releases it first.",
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
    "--max-input-bytes",
    envvar="STOPLINE_MAX_INPUT_BYTES",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_input_bytes,
    show_default=True,
    help="Largest agent input accepted (compact JSON); checked before calling the runtime.",
)
@click.option(
    "--max-page-size",
    envvar="STOPLINE_MAX_PAGE_SIZE",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_page_size,
    show_default=True,
    help="Largest page_size ListOperations accepts.",
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
    "--max-streams",
    envvar="STOPLINE_MAX_STREAMS",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_streams,
    show_default=True,
    help="Open streams this gateway serves at once; more answer RESOURCE_EXHAUSTED.",
)
@click.option(
    "--max-streams-per-principal",
    envvar="STOPLINE_MAX_STREAMS_PER_PRINCIPAL",
    type=click.IntRange(min=1),
    default=None,
    help="Open streams one principal may hold on this gateway (default: only --max-streams).",
)
@click.option(
    "--max-running-per-principal",
    envvar="STOPLINE_MAX_RUNNING_PER_PRINCIPAL",
    type=click.IntRange(min=1),
    default=None,
    help="Unfinished operations one principal may have; more starts answer RESOURCE_EXHAUSTED.",
)
@click.option(
    "--stream-idle-seconds",
    envvar="STOPLINE_STREAM_IDLE_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.stream_idle_seconds,
    show_default=True,
    help="A stream with nothing to send for this long ends with DEADLINE_EXCEEDED (0: never).",
)
@click.option(
    "--api-keys-file",
    envvar="STOPLINE_API_KEYS_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help=f"TOML or JSON file of hashed API keys (re-read when it changes); or {API_KEYS_ENV}.",
)
@click.option("--jwt-issuer", envvar="STOPLINE_JWT_ISSUER", help="Accept JWTs from this issuer.")
@click.option("--jwt-audience", envvar="STOPLINE_JWT_AUDIENCE", help="The audience JWTs must name.")
@click.option(
    "--jwt-public-key-file",
    envvar="STOPLINE_JWT_PUBLIC_KEY_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help=f"PEM public key for RS256/ES256 JWTs (HS256: set {JWT_SECRET_ENV}).",
)
@server_tls_options("STOPLINE_GATEWAY")
@click.option(
    "--runtime-tls-ca",
    envvar="STOPLINE_RUNTIME_TLS_CA",
    type=click.Path(exists=True, dir_okay=False),
    help="Call the runtime over TLS, trusting this CA.",
)
@click.option(
    "--runtime-tls-cert",
    envvar="STOPLINE_RUNTIME_TLS_CLIENT_CERT",
    type=click.Path(exists=True, dir_okay=False),
    help="Client certificate for the runtime (mutual TLS).",
)
@click.option(
    "--runtime-tls-key",
    envvar="STOPLINE_RUNTIME_TLS_CLIENT_KEY",
    type=click.Path(exists=True, dir_okay=False),
    help="Key of --runtime-tls-cert.",
)
@service_token_file_option
@reflection_option
@metrics_address_option
@click.option("--log-level", envvar="STOPLINE_LOG_LEVEL", default="INFO", show_default=True)
@log_format_option
def serve(
    address: str,
    runtime_address: str,
    runtime_load_balancing: str,
    stop_ack_timeout: float,
    stop_delivery_deadline: float,
    watch_reconnect_deadline: float,
    start_hold: float,
    shutdown_grace: float,
    max_input_bytes: int,
    max_page_size: int,
    max_request_bytes: int,
    max_streams: int,
    max_streams_per_principal: int | None,
    max_running_per_principal: int | None,
    stream_idle_seconds: float,
    api_keys_file: str | None,
    jwt_issuer: str | None,
    jwt_audience: str | None,
    jwt_public_key_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    runtime_tls_ca: str | None,
    runtime_tls_cert: str | None,
    runtime_tls_key: str | None,
    service_token_file: str | None,
    reflection: bool,
    metrics_address: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Serve GatewayService (with health and reflection) until SIGTERM/SIGINT.

    Refuses to start without credentials for its callers (API keys and/or JWTs)."""
    from gateway_service.server import serve as serve_gateway

    logs.configure(log_level, log_format)
    try:
        tracing.configure_from_env(
            "stopline-gateway", export_process=True
        )  # off unless OTEL_* variables say otherwise
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    jwt_secret = os.environ.get(JWT_SECRET_ENV) or None
    jwt_settings = None
    if jwt_issuer or jwt_audience or jwt_public_key_file or jwt_secret:
        if not jwt_issuer or not jwt_audience:
            raise click.UsageError("JWTs need both --jwt-issuer and --jwt-audience")
        jwt_settings = JwtSettings(jwt_issuer, jwt_audience, jwt_secret, jwt_public_key_file)
    runtime_tls = None
    if runtime_tls_ca or runtime_tls_cert or runtime_tls_key:
        if (runtime_tls_cert is None) != (runtime_tls_key is None):
            raise click.UsageError("--runtime-tls-cert and --runtime-tls-key go together")
        runtime_tls = ClientTLS(runtime_tls_ca, runtime_tls_cert, runtime_tls_key)
    tokens = service_tokens(service_token_file)
    try:
        auth = AuthSettings.from_environment(api_keys_file, jwt_settings)
    except AuthConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    config = GatewayConfig(
        address=address,
        metrics_address=metrics_address,
        runtime_address=runtime_address,
        runtime_load_balancing=LoadBalancing(runtime_load_balancing),
        stop_ack_seconds=stop_ack_timeout,
        stop_delivery_deadline_seconds=stop_delivery_deadline,
        watch_reconnect_deadline_seconds=watch_reconnect_deadline,
        start_hold_seconds=start_hold,
        shutdown_grace_seconds=shutdown_grace,
        max_input_bytes=max_input_bytes,
        max_page_size=max_page_size,
        max_request_bytes=max_request_bytes,
        max_streams=max_streams,
        max_streams_per_principal=max_streams_per_principal,
        max_running_per_principal=max_running_per_principal,
        stream_idle_seconds=stream_idle_seconds,
        auth=auth,
        tls=server_tls(tls_cert, tls_key, tls_client_ca),
        service_token=tokens[0] if tokens else None,
        runtime_tls=runtime_tls,
        reflection=reflection,
    )
    try:
        try:
            asyncio.run(serve_gateway(config))
        finally:
            tracing.shutdown()  # export the spans still buffered
    except (OSError, AuthConfigError) as exc:
        raise click.ClickException(str(exc)) from exc


@gateway.command("new-key")
@click.option("--principal", required=True, help="Who the key identifies (owner of operations).")
def new_key_command(principal: str) -> None:
    """Create an API key: prints the token once, and the hashed entry for the key file."""
    try:
        token, key = new_key(principal)
    except KeyFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--principal") from exc
    click.echo(f"token for {principal} (shown only now; the gateway keeps just its hash):")
    click.echo(f"  {token}\n")
    click.echo("add to the --api-keys-file (TOML):\n")
    click.echo(key.toml())
    click.echo(f"or append to {API_KEYS_ENV} (comma-separated): {key.env_entry()}")
