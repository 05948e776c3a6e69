"""How a `stopline` command reaches the gateway: the --gateway, --token and --tls-ca options,
the channel, the command's span (the root of its trace), and the gateway's errors as exit
statuses (1, or 69 when a retry could fix the error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import grpc
from grpc import aio

from stopline import tracing
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import EXIT_FAILED
from stopline.transport import (
    DEFAULT_GATEWAY_ADDRESS,
    GATEWAY_ADDRESS_ENV,
    TOKEN_ENV,
    ClientTLS,
    open_channel,
)

EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE: the same command may work later
UNARY_TIMEOUT = 10.0
CLIENT_SERVICE_NAME = "stopline-cli"
"""The command's service.name in traces (OTEL_SERVICE_NAME overrides it)."""

# A stream can sit silent for a whole long step; keepalive notices a dead path meanwhile. The
# servers accept pings this frequent (stopline.serving.server_options).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


class GatewayError(click.ClickException):
    """A gRPC error shown as "<CODE>: <details>" on stderr."""

    exit_code = EXIT_FAILED

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class GatewayUnavailable(GatewayError):
    """UNAVAILABLE gets its own exit status: a script may simply try again later."""

    exit_code = EXIT_UNAVAILABLE


def gateway_error(code: grpc.StatusCode, details: str) -> GatewayError:
    if code is grpc.StatusCode.UNAVAILABLE:
        return GatewayUnavailable(code, details)
    return GatewayError(code, details)


def from_rpc_error(exc: aio.AioRpcError, hint: str = "") -> GatewayError:
    return gateway_error(exc.code(), (exc.details() or "") + hint)


@dataclass(frozen=True)
class Target:
    """Which gateway to call and how: its address, the caller's token, TLS trust."""

    address: str
    token: str | None = None
    tls_ca: str | None = None


def connect(target: Target | str) -> aio.Channel:
    """A channel to the gateway; with tracing on, every call carries the caller's trace
    context (open it inside `command_span` for the command's span to be the parent)."""
    if isinstance(target, str):
        target = Target(target)
    tls = ClientTLS(ca_file=target.tls_ca) if target.tls_ca else None
    return open_channel(
        target.address, target.token, tls, CHANNEL_OPTIONS, tracing.client_interceptors()
    )


@contextmanager
def command_span(name: str, **attributes: str) -> Iterator[None]:
    """The command's span, the root of its trace: the gateway's and the runtime's spans of the
    calls made inside it are its children. Tracing is switched on by the same OTEL_* variables as
    the services' (nothing is set up or sent when they are unset), and what was recorded is
    exported before the command exits."""
    configured = False
    if not tracing.enabled():
        try:
            configured = tracing.configure_from_env(CLIENT_SERVICE_NAME)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    try:
        with tracing.tracer().start_as_current_span(
            name, attributes={f"stopline.{key}": value for key, value in attributes.items()}
        ):
            yield
    finally:
        if configured:
            tracing.uninstall()


def gateway_stub(channel: aio.Channel) -> pb_grpc.GatewayServiceAsyncStub:
    return pb_grpc.GatewayServiceStub(channel)


async def unary_call(
    target: Target, call: Callable[[pb_grpc.GatewayServiceAsyncStub], Any], name: str
) -> Any:
    """The one call of a command that asks once and prints the answer, in the command's span;
    a gRPC error becomes the command's error (and exit status)."""
    with command_span(name):
        async with connect(target) as channel:
            try:
                return await call(gateway_stub(channel))
            except aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc


# --------------------------------------------------------------------------- options


def _target(address: str, token: str | None, tls_ca: str | None) -> Target:
    return Target(address, token or None, tls_ca)


def gateway_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--gateway, --token and --tls-ca; the command receives them as one `target`."""

    def build(**kwargs: Any) -> Any:
        target = _target(kwargs.pop("address"), kwargs.pop("token"), kwargs.pop("tls_ca"))
        return fn(target=target, **kwargs)

    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    # Options declared below this decorator were attached to `fn`; click collects them here.
    build.__click_params__ = list(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
    build = click.option(
        "--tls-ca",
        envvar="STOPLINE_TLS_CA",
        type=click.Path(exists=True, dir_okay=False),
        help="The gateway serves TLS: trust this CA.",
    )(build)
    build = click.option(
        "--token",
        envvar=TOKEN_ENV,
        help=f"Your API key or JWT for the gateway (or set {TOKEN_ENV}).",
    )(build)
    return click.option(
        "--gateway",
        "address",
        envvar=GATEWAY_ADDRESS_ENV,
        default=DEFAULT_GATEWAY_ADDRESS,
        show_default=True,
        help="Gateway address.",
    )(build)
