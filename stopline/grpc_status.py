"""Every domain error mapped to a gRPC status code, in one place, for both services' servicers.

Handlers are wrapped with `unary` or `server_stream`; anything they raise becomes a deliberate
status: domain errors their own code, a lost database UNAVAILABLE (a retry can fix it), and a bug
INTERNAL with a reference to the logged traceback -- never UNKNOWN, never a stack trace on the wire.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from stopline import errors

log = logging.getLogger(__name__)

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

STATUS_BY_ERROR: dict[type[errors.StoplineError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


class UpstreamError(Exception):
    """A call to another Stopline service failed with this status; passed on to our caller as is
    (the runtime's own message already names the field or the limit)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, exc: aio.AioRpcError) -> UpstreamError:
        return cls(exc.code(), exc.details() or "")


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, UpstreamError):
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return grpc.StatusCode.UNAVAILABLE, f"the runtime is unavailable ({exc.details}); retry"
        return exc.code, exc.details
    for error_type, code in STATUS_BY_ERROR.items():
        if isinstance(exc, error_type):
            return code, str(exc)
    if isinstance(exc, OperationalError | DisconnectionError | PoolTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        log.warning("database unavailable: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry shortly"
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"


async def _abort(context: aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def unary(
    handler: Callable[[S, Req, aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[S, Req, aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await handler(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def server_stream(
    handler: Callable[[S, Req, aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp, None]],
) -> Callable[[S, Req, aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp, None]]:
    @functools.wraps(handler)
    async def wrapper(
        self: S, request: Req, context: aio.ServicerContext[Req, Resp]
    ) -> AsyncGenerator[Resp, None]:
        try:
            # aclosing: a cancelled call closes the handler's generator now, so its `finally`
            # (cleanup, cancel policies) runs at once rather than whenever it is collected.
            async with contextlib.aclosing(handler(self, request, context)) as items:
                async for item in items:
                    yield item
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper
