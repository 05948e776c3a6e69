"""`stopline gateway ...`: serve the gateway in front of a runtime."""

from __future__ import annotations

import asyncio
import logging

import click

from gateway_service.config import GatewayConfig

_DEFAULTS = GatewayConfig()


@click.group("gateway")
def gateway() -> None:
    """The gateway service: start, stream, reconnect and stop operations for clients."""


@gateway.command()
@click.option(
    "--address",
    envvar="STOPLINE_GATEWAY_ADDRESS",
    default=_DEFAULTS.address,
    show_default=True,
    help="host:port to listen on.",
)
@click.option(
    "--runtime",
    "runtime_address",
    envvar="STOPLINE_RUNTIME_ADDRESS",
    default=_DEFAULTS.runtime_address,
    show_default=True,
    help="The runtime's host:port.",
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
    # The runtime refuses holds over 60 s, and a zero hold would let a stop sent during the start
    # arrive after the first step began.
    type=click.FloatRange(min=0, min_open=True, max=60),
    default=_DEFAULTS.start_hold_seconds,
    show_default=True,
    help="Seconds the runtime holds a new operation unless the gateway releases it first.",
)
@click.option(
    "--release-delay",
    envvar="STOPLINE_RELEASE_DELAY_SECONDS",
    type=click.FloatRange(min=0, max=5),
    default=_DEFAULTS.release_delay_seconds,
    show_default=True,
    help="Seconds between sending a new operation's id and letting it run.",
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
    "--stream-idle-seconds",
    envvar="STOPLINE_STREAM_IDLE_SECONDS",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.stream_idle_seconds,
    show_default=True,
    help="A stream with nothing to send for this long ends with DEADLINE_EXCEEDED (0: never).",
)
@click.option("--log-level", envvar="STOPLINE_LOG_LEVEL", default="INFO", show_default=True)
def serve(
    address: str,
    runtime_address: str,
    stop_ack_timeout: float,
    stop_delivery_deadline: float,
    watch_reconnect_deadline: float,
    start_hold: float,
    release_delay: float,
    shutdown_grace: float,
    max_input_bytes: int,
    max_page_size: int,
    max_request_bytes: int,
    max_streams: int,
    stream_idle_seconds: float,
    log_level: str,
) -> None:
    """Serve GatewayService (with health and reflection) until SIGTERM/SIGINT."""
    from gateway_service.server import serve as serve_gateway

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = GatewayConfig(
        address=address,
        runtime_address=runtime_address,
        stop_ack_seconds=stop_ack_timeout,
        stop_delivery_deadline_seconds=stop_delivery_deadline,
        watch_reconnect_deadline_seconds=watch_reconnect_deadline,
        start_hold_seconds=start_hold,
        release_delay_seconds=release_delay,
        shutdown_grace_seconds=shutdown_grace,
        max_input_bytes=max_input_bytes,
        max_page_size=max_page_size,
        max_request_bytes=max_request_bytes,
        max_streams=max_streams,
        stream_idle_seconds=stream_idle_seconds,
    )
    try:
        asyncio.run(serve_gateway(config))
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
