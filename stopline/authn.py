"""A server interceptor that authenticates every call before any servicer code runs.

Both services use it with their own check: the gateway with API keys and JWTs
(gateway_service.auth), the runtime with the shared service credential (runtime_service.trust).
Health and reflection are exempt, so probes, load balancers and `grpcurl list` keep working
without credentials.

The check's result (the principal) is put in a context variable (stopline.caller) of the call's
own task, which runs the method's behaviour next; servicers and log lines read it with
`current_principal()`. A rejected call is answered by a handler that aborts with the status that
stopline.grpc_status assigns to errors.Unauthenticated.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from stopline import errors
from stopline.caller import principal_var
from stopline.logs import fields
from stopline.transport import AUTHORIZATION

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods reachable without credentials: they reveal nothing about operations."""

if TYPE_CHECKING:  # generic in the stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor = aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _ServerInterceptor = aio.ServerInterceptor
Metadata = Sequence[tuple[str, str | bytes]]
Check = Callable[[Metadata], str]
"""Returns the caller's principal, or raises errors.Unauthenticated."""


def bearer_token(metadata: Metadata) -> str:
    """The token of `authorization: Bearer <token>`; errors.Unauthenticated saying what to send."""
    values = [v for k, v in metadata if k.lower() == AUTHORIZATION]
    if not values:
        raise errors.Unauthenticated(
            "missing credentials: send the metadata 'authorization: Bearer <token>'"
        )
    if len(values) > 1:
        raise errors.Unauthenticated("send exactly one 'authorization' metadata entry")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthenticated("the 'authorization' metadata must be 'Bearer <token>'")
    return token.strip()


def _denied(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    return _rebuild(handler, unary, streaming)


def _rebuild(
    handler: Handler,
    unary: Callable[..., Awaitable[Any]],
    streaming: Callable[..., AsyncIterator[Any]],
) -> Handler:
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    return grpc.unary_unary_rpc_method_handler(unary, des, ser)


class AuthInterceptor(_ServerInterceptor):
    """Runs `check` on the metadata of every non-exempt call. `check` must be cheap and must not
    block (hash comparisons, signature checks): it runs on the event loop."""

    def __init__(self, check: Check, what: str) -> None:
        self._check = check
        self._what = what

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        try:
            principal = self._check(handler_call_details.invocation_metadata or ())
        except errors.Unauthenticated as exc:
            # Imported here: client commands never need the status mapping.
            from stopline.grpc_status import status_for

            log.info(
                "authentication failed",
                extra=fields(check=self._what, method=method, why=str(exc)),
            )
            code, message = status_for(exc)
            return _denied(handler, code, message)
        # grpc.aio runs a call's interceptors and then its behaviour in one task of the call's
        # own, so the principal set here is that call's alone, with no wrapper around the
        # behaviour (a wrapper made per call cost ~60 µs of every call: bench/interceptors.py).
        principal_var.set(principal)
        return handler
