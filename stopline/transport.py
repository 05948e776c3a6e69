"""Channels and listening ports with the credentials Stopline uses: a bearer token in the
`authorization` metadata of every call, optionally over TLS (server-authenticated, or mutual).

The token travels as metadata added by a client interceptor rather than as gRPC call credentials,
because gRPC refuses call credentials on plaintext channels, and local development (and the
in-process tests) run plaintext. Over TLS the same interceptor is used, so there is one path.
Where calls are many (the gateway's link to the runtime), the caller passes `bearer_metadata`
with each call instead: an aio client interceptor costs about 150 µs per unary call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

# Where each service listens by default, and so where the other side and the command look for it.
DEFAULT_RUNTIME_ADDRESS = "127.0.0.1:50051"
DEFAULT_GATEWAY_ADDRESS = "127.0.0.1:50052"
# The environment variables that set them, for the services and for the command alike.
RUNTIME_ADDRESS_ENV = "STOPLINE_RUNTIME_ADDRESS"
GATEWAY_ADDRESS_ENV = "STOPLINE_GATEWAY_ADDRESS"

AUTHORIZATION = "authorization"
# Initial metadata of a runtime's operation stream: the address (host:port) at which the replica
# that sent it, and runs the operation, can be called itself (its --advertise-address).
REPLICA_METADATA = "stopline-replica"
BEARER = "Bearer "

TOKEN_ENV = "STOPLINE_TOKEN"
"""A client's token for the gateway (API key or JWT)."""
SERVICE_TOKEN_ENV = "STOPLINE_SERVICE_TOKEN"
"""The shared service credential: the runtime accepts it, the gateway sends it."""


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """host:port (an IPv6 host in brackets) as (host, port), for every address a flag takes;
    ValueError naming the flag's `what` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{what} {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key; with `client_ca`, clients must present a certificate
    signed by that CA (mutual TLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        key = _read(self.key_file, "TLS key")
        cert = _read(self.cert_file, "TLS certificate")
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the server (`ca_file`; None: the system roots) and, for mutual TLS,
    the certificate it presents."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Name to verify in the server's certificate when it differs from the dialled host.
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both its certificate and its key file")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA") if self.ca_file else None,
            private_key=_read(self.key_file, "TLS key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "TLS certificate") if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, BEARER + token),)


if TYPE_CHECKING:  # the stubs make these generic; the classes themselves are not
    _AsyncUU = aio.UnaryUnaryClientInterceptor[Any, Any]
    _AsyncUS = aio.UnaryStreamClientInterceptor[Any, Any]
    _AsyncSU = aio.StreamUnaryClientInterceptor[Any, Any]
    _AsyncSS = aio.StreamStreamClientInterceptor[Any, Any]
    _SyncUU = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _SyncUS = grpc.UnaryStreamClientInterceptor[Any, Any]
else:
    _AsyncUU = aio.UnaryUnaryClientInterceptor
    _AsyncUS = aio.UnaryStreamClientInterceptor
    _AsyncSU = aio.StreamUnaryClientInterceptor
    _AsyncSS = aio.StreamStreamClientInterceptor
    _SyncUU = grpc.UnaryUnaryClientInterceptor
    _SyncUS = grpc.UnaryStreamClientInterceptor


class _AsyncToken:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add(AUTHORIZATION, BEARER + self._token)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One object per call type: an aio channel files each interceptor under the first type it is.
class _UnaryUnaryToken(_AsyncToken, _AsyncUU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamToken(_AsyncToken, _AsyncUS):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryToken(_AsyncToken, _AsyncSU):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamToken(_AsyncToken, _AsyncSS):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def token_interceptors(token: str) -> list[Any]:
    return [
        _UnaryUnaryToken(token),
        _UnaryStreamToken(token),
        _StreamUnaryToken(token),
        _StreamStreamToken(token),
    ]


def open_channel(
    address: str,
    token: str | None = None,
    tls: ClientTLS | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> aio.Channel:
    """An aio channel that sends `token` (if any) with every call, over TLS when `tls` is set;
    `interceptors` run before the token's."""
    chosen = [*interceptors, *(token_interceptors(token) if token else ())] or None
    if tls is None:
        return aio.insecure_channel(address, options=list(options), interceptors=chosen)
    return aio.secure_channel(
        address,
        tls.credentials(),
        options=[*options, *tls.options()],
        interceptors=chosen,
    )


class _SyncToken(_SyncUU, _SyncUS):
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: Any) -> Any:
        return _SyncDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *bearer_metadata(self._token)),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


def open_sync_channel(
    address: str,
    token: str | None = None,
    tls: ClientTLS | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """The synchronous twin of `open_channel`, for the runtime's debugging CLI."""
    if tls is None:
        channel = grpc.insecure_channel(address, options=list(options))
    else:
        channel = grpc.secure_channel(
            address, tls.credentials(), options=[*options, *tls.options()]
        )
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel


def read_token_file(path: str | os.PathLike[str]) -> list[str]:
    """Tokens in a file, one per line; blank lines and `#` comments are skipped. Several lines
    let an operator rotate a service credential without downtime (accept old and new)."""
    text = _read(path, "token file").decode()
    tokens = [line.strip() for line in text.splitlines()]
    return [t for t in tokens if t and not t.startswith("#")]


def token_from(path: str | None, env: str) -> str | None:
    """The client token: the first token of `path` if given, else the environment variable."""
    if path:
        tokens = read_token_file(path)
        if not tokens:
            raise ValueError(f"token file {path} holds no token")
        return tokens[0]
    return os.environ.get(env) or None
