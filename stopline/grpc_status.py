"""Every domain error mapped to a gRPC status code, in one place, for both services' servicers.

Handlers are wrapped with `unary` or `server_stream`; anything they raise becomes a deliberate
status: domain errors their own code (a lost database arrives as Unavailable: storage translates
its failures), an upstream service's error its own, and a bug INTERNAL with a reference to the
logged traceback -- never UNKNOWN, never a stack trace on the wire.

Bytes that are not a valid request message never reach a handler as an exception: gRPC itself
would answer those UNKNOWN with the DecodeError's text. `MalformedRequestGuard` (a server
interceptor) makes them INVALID_ARGUMENT instead, for every unary-request method of the server.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio

from stopline import errors
from stopline.handlers import Handler, WrappedHandlers, with_behaviour
from stopline.limits import too_deep

log = logging.getLogger(__name__)

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

STATUS_BY_ERROR: dict[type[errors.StoplineError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
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
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"


async def _abort(context: aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """What request bytes that do not parse as the method's message deserialize to."""

    message_type: str
    problem: str
    # Set when the reason is known in the caller's terms (input nested too deeply), replacing
    # the decoder's own words.
    error: errors.InvalidArgument | None = None

    def as_error(self) -> errors.InvalidArgument:
        if self.error is not None:
            return self.error
        return errors.InvalidArgument(
            "request", f"is not a valid {self.message_type} message ({self.problem})"
        )

    def describe(self) -> str:
        return str(self.as_error())


def _refuse_malformed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise request.as_error()


def unary(
    handler: Callable[[S, Req, aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[S, Req, aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            _refuse_malformed(request)
            return await handler(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    wrapper.refuses_malformed = True  # type: ignore[attr-defined]
    return wrapper


def server_stream(
    handler: Callable[[S, Req, aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp, None]],
) -> Callable[[S, Req, aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp, None]]:
    @functools.wraps(handler)
    async def wrapper(
        self: S, request: Req, context: aio.ServicerContext[Req, Resp]
    ) -> AsyncGenerator[Resp, None]:
        try:
            _refuse_malformed(request)
            # aclosing: a cancelled call closes the handler's generator now, so its `finally`
            # (cleanup, cancel policies) runs at once rather than whenever it is collected.
            async with contextlib.aclosing(handler(self, request, context)) as items:
                async for item in items:
                    yield item
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    wrapper.refuses_malformed = True  # type: ignore[attr-defined]
    return wrapper


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that hands malformed bytes to the handler as a MalformedRequest."""
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(message_type, "full_name", "request")
    fields = getattr(message_type, "fields_by_name", {})
    # Only Struct input nests deeply in a valid request, so protobuf's nesting limit (about 33
    # levels of input: each level is a Struct and a Value) is the input's depth limit there.
    deep_field = "input" if "input" in fields else None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, bad UTF-8, nesting too deep: all the caller's
            text = str(exc)
            error = too_deep(deep_field) if deep_field and _is_depth_error(text) else None
            return MalformedRequest(name, text.split(": ")[-1][:200], error)

    return parse


def _is_depth_error(text: str) -> bool:
    """protobuf's upb decoder says "Exceeded upb_DecodeOptions_MaxDepth"; the pure-Python one
    "Error parsing message: too many levels of nesting"."""
    lowered = text.lower()
    return "maxdepth" in lowered or "levels of nesting" in lowered or "recursion" in lowered


async def _refuse(context: aio.ServicerContext[Any, Any], request: MalformedRequest) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
    raise AssertionError("unreachable: abort raises")


def _guard_behaviour(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """Handlers not wrapped by `unary`/`server_stream` (health, reflection) get the check here."""
    if getattr(behaviour, "refuses_malformed", False):
        return behaviour
    if inspect.isasyncgenfunction(behaviour):

        async def guarded_stream(request: Any, context: Any) -> AsyncGenerator[Any, None]:
            if isinstance(request, MalformedRequest):
                await _refuse(context, request)
            async for item in behaviour(request, context):
                yield item

        return guarded_stream

    async def guarded(request: Any, context: Any) -> Any:
        if isinstance(request, MalformedRequest):
            await _refuse(context, request)
        return await behaviour(request, context)

    return guarded


class MalformedRequestGuard(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers INVALID_ARGUMENT, naming the message type, to bytes that are not valid protobuf
    (corrupt wire format, invalid UTF-8 in a string field, nesting past protobuf's limit)."""

    def __init__(self) -> None:
        self._guarded = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._guarded.get(method, handler)
        if cached is not None:
            return cached
        guarded = with_behaviour(handler, _guard_behaviour)._replace(
            request_deserializer=_lenient(handler.request_deserializer)
        )
        return self._guarded.keep(method, handler, guarded)
