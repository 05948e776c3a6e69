"""Credentials every test and the benchmark harness use, so in-process fixtures, subprocess
services and the `stopline` commands all authenticate the way production does.

Fixed values (not secrets: they only ever guard throwaway test servers)."""

from __future__ import annotations

import functools
from typing import Any

import grpc
from grpc import aio

from gateway_service.auth import AuthSettings
from gateway_service.keys import ApiKey, hash_token
from stopline.transport import (
    SERVICE_TOKEN_ENV,
    TOKEN_ENV,
    bearer_metadata,
    open_channel,
    open_sync_channel,
)

SERVICE_TOKEN = "test-service-credential-0123456789abcdef"
TOKEN = "stl_7e57c0de_tester-secret-0123456789abcdefghijklmnopqrstuv"
PRINCIPAL = "tester"
OTHER_TOKEN = "stl_07e4b0b0_other-secret-0123456789abcdefghijklmnopqrstuv"
OTHER_PRINCIPAL = "other"

KEYS = (
    ApiKey("7e57c0de", PRINCIPAL, hash_token(TOKEN)),
    ApiKey("07e4b0b0", OTHER_PRINCIPAL, hash_token(OTHER_TOKEN)),
)
AUTH = AuthSettings(keys=KEYS)
API_KEYS_VALUE = ",".join(k.env_entry() for k in KEYS)

ENV = {
    SERVICE_TOKEN_ENV: SERVICE_TOKEN,  # the runtime accepts it, the gateway and tools send it
    "STOPLINE_API_KEYS": API_KEYS_VALUE,  # the gateway's keys
    TOKEN_ENV: TOKEN,  # the `stopline` client commands
}
"""Environment for subprocess services and commands."""


def gateway_channel(address: str, token: str | None = TOKEN) -> aio.Channel:
    return open_channel(address, token)


def runtime_channel(address: str, token: str | None = SERVICE_TOKEN) -> aio.Channel:
    return open_channel(address, token)


def gateway_sync_channel(address: str, token: str | None = TOKEN) -> grpc.Channel:
    """The synchronous `grpc` twin of `gateway_channel`, for tests driving plain threads."""
    return open_sync_channel(address, token)


def runtime_sync_channel(address: str, token: str | None = SERVICE_TOKEN) -> grpc.Channel:
    return open_sync_channel(address, token)


class WithToken:
    """A stub whose every call carries `token` as call metadata, with no client interceptor:
    gRPC's aio interceptors cost about 150 µs per unary call and 10 µs per streamed message,
    which the benchmark client should not add to what it measures."""

    def __init__(self, stub: Any, token: str) -> None:
        self._stub = stub
        self._metadata = bearer_metadata(token)

    def __getattr__(self, method: str) -> Any:
        return functools.partial(getattr(self._stub, method), metadata=self._metadata)
