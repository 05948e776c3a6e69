"""Command-line options for TLS, the service credential and reflection, shared by both `serve`
commands so they are spelled and checked the same way."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from stopline.transport import SERVICE_TOKEN_ENV, ServerTLS, read_token_file

F = TypeVar("F", bound=Callable[..., Any])


def server_tls_options(env_prefix: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        fn = click.option(
            "--tls-client-ca",
            envvar=f"{env_prefix}_TLS_CLIENT_CA",
            type=click.Path(exists=True, dir_okay=False),
            help="Require client certificates signed by this CA (mutual TLS).",
        )(fn)
        fn = click.option(
            "--tls-key",
            envvar=f"{env_prefix}_TLS_KEY",
            type=click.Path(exists=True, dir_okay=False),
            help="PEM private key of --tls-cert.",
        )(fn)
        return click.option(
            "--tls-cert",
            envvar=f"{env_prefix}_TLS_CERT",
            type=click.Path(exists=True, dir_okay=False),
            help="Serve TLS with this PEM certificate (chain); plaintext when omitted.",
        )(fn)

    return decorate


def server_tls(cert: str | None, key: str | None, client_ca: str | None) -> ServerTLS | None:
    if cert is None and key is None:
        if client_ca is not None:
            raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together")
    return ServerTLS(cert, key, client_ca)


service_token_file_option = click.option(
    "--service-token-file",
    envvar="STOPLINE_SERVICE_TOKEN_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help=f"File with the service credential (one token per line); or set {SERVICE_TOKEN_ENV}.",
)

reflection_option = click.option(
    "--reflection/--no-reflection",
    envvar="STOPLINE_REFLECTION",
    default=True,
    show_default=True,
    help="Serve gRPC reflection (switch it off in production to not describe the API to anyone).",
)


def service_tokens(path: str | None) -> tuple[str, ...]:
    """Every token of the file, else the one in STOPLINE_SERVICE_TOKEN, else none."""
    if path:
        try:
            tokens = read_token_file(path)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        if not tokens:
            raise click.UsageError(f"--service-token-file {path} holds no token")
        return tuple(tokens)
    value = os.environ.get(SERVICE_TOKEN_ENV, "").strip()
    return (value,) if value else ()
