"""What the server interceptors share about a method's handler: which of its fields holds the
behaviour, and a per-method cache of the handlers they wrap.

grpc.aio asks every server interceptor for the handler of every call. The handler the server
finds for a method is the same object call after call, so an interceptor wraps it once and keeps
the wrapper, keyed by method, for as long as the continuation answers with that same handler:
the per-call cost is then one dictionary look-up and an identity check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Any  # grpc.RpcMethodHandler (a namedtuple whose fields grpc-stubs leave untyped)


def behaviour_field(handler: Handler) -> str:
    """The field that holds the handler's behaviour: unary_unary, unary_stream, stream_unary or
    stream_stream."""
    return ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )


def with_behaviour(
    handler: Handler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Handler:
    """The handler with its behaviour wrapped by `wrap`."""
    field = behaviour_field(handler)
    return handler._replace(**{field: wrap(getattr(handler, field))})


class WrappedHandlers:
    """An interceptor's wrapped handlers, one per method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, handler: Handler) -> Handler | None:
        """The wrapper kept for this method's handler, if it is still that handler's."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        return None

    def keep(self, method: str, handler: Handler, wrapped: Handler) -> Handler:
        """Keep `wrapped` as the method's wrapper of `handler`; returns it."""
        self._wrapped[method] = (handler, wrapped)
        return wrapped
