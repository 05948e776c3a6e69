"""A gRPC relay that injects faults between a client (the gateway) and a server (the runtime).

It relays raw bytes, so it serves any service whose protos are imported (the kind of each method,
unary-unary or unary-stream, is read from the default descriptor pool), and passes metadata and
deadlines on. Faults are set per method, by bare name (`"StartOperation"`):

- `drop_answers(method, n)`: the next n calls reach the server, which answers; the caller gets
  UNAVAILABLE instead of that answer (for a stream: before its first message), as if the
  connection broke after the server had committed.
- `fail_calls(method, n)`: the next n calls are answered UNAVAILABLE without reaching the server,
  as by a replica that is going away.
- `delay(method, seconds)`: every answer (each stream message) is held back this long.
- `break_streams(method, after, n)`: the next n streams of the method are cut with UNAVAILABLE
  right after their first `after` messages were relayed, as by a connection that broke mid-way.
- `freeze(method)` / `unfreeze(method)`: calls (and stream messages) wait, unanswered and not
  forwarded, until unfrozen, like a server stopped with SIGSTOP. No method: every method.

Runs in the test's event loop on a free port: `async with FaultProxy(target) as proxy:` and point
the client at `proxy.address`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import descriptor_pool
from grpc import aio

ALL = "*"
DROPPED = "fault proxy: the answer was dropped after the server had answered"
FAILED = "fault proxy: the call failed before it reached the server"
BROKEN = "fault proxy: the stream broke mid-way"
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# Set by gRPC for each hop, never relayed.
_HOP_METADATA = ("user-agent", "grpc-", ":")


def _identity(data: bytes) -> bytes:
    return data


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target
        self.address = ""
        # Calls seen, answers dropped, and calls now waiting on a freeze, by bare method name.
        self.calls: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.broken: Counter[str] = Counter()
        self.held: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._breaks: Counter[str] = Counter()
        self._break_after: dict[str, int] = {}
        self._delays: dict[str, float] = {}
        self._frozen: set[str] = set()
        self._thaw = asyncio.Event()
        self._server = aio.server(options=_OPTIONS)
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self._channel = aio.insecure_channel(target, options=_OPTIONS)

    async def __aenter__(self) -> FaultProxy:
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self._server.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unfreeze()
        await self._server.stop(grace=None)
        await self._channel.close(grace=None)

    # ------------------------------------------------------------------ controls

    def drop_answers(self, method: str, count: int = 1) -> None:
        self._drops[method] += count

    def fail_calls(self, method: str, count: int = 1) -> None:
        self._failures[method] += count

    def break_streams(self, method: str, after: int, count: int = 1) -> None:
        self._breaks[method] += count
        self._break_after[method] = after

    def delay(self, method: str, seconds: float) -> None:
        self._delays[method] = seconds

    def freeze(self, method: str = ALL) -> None:
        self._frozen.add(method)

    def unfreeze(self, method: str | None = None) -> None:
        """Unfreeze one method, or (no method) everything."""
        if method is None:
            self._frozen.clear()
        else:
            self._frozen.discard(method)
        self._thaw.set()
        self._thaw = asyncio.Event()

    # ------------------------------------------------------------------ relaying

    async def _pass(self, method: str) -> None:
        """Wait while the method is frozen, then for its delay."""
        while ALL in self._frozen or method in self._frozen:
            thaw = self._thaw
            self.held[method] += 1
            try:
                await thaw.wait()
            finally:
                self.held[method] -= 1
        if delay := self._delays.get(method):
            await asyncio.sleep(delay)  # the injected delay itself

    @staticmethod
    def _take(planned: Counter[str], done: Counter[str], method: str) -> bool:
        if planned[method] <= 0:
            return False
        planned[method] -= 1
        done[method] += 1
        return True

    async def _enter(self, method: str, context: aio.ServicerContext[Any, Any]) -> None:
        self.calls[method] += 1
        await self._pass(method)
        if self._take(self._failures, self.failed, method):
            await context.abort(grpc.StatusCode.UNAVAILABLE, FAILED)

    async def unary(self, path: str, request: bytes, context: aio.ServicerContext[Any, Any]) -> Any:
        method = _bare(path)
        await self._enter(method, context)
        call = self._channel.unary_unary(path, _identity, _identity)
        try:
            answer = await call(request, **_forwarded(context))
        except aio.AioRpcError as exc:
            await _abort(context, exc)
        if self._take(self._drops, self.dropped, method):
            await context.abort(grpc.StatusCode.UNAVAILABLE, DROPPED)
        await self._pass(method)
        return answer

    async def stream(
        self, path: str, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        method = _bare(path)
        await self._enter(method, context)
        call = self._channel.unary_stream(path, _identity, _identity)(
            request, **_forwarded(context)
        )
        drop = self._take(self._drops, self.dropped, method)
        cut = self._break_after[method] if self._take(self._breaks, self.broken, method) else None
        relayed = 0
        try:
            async for message in call:
                if drop:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, DROPPED)
                await self._pass(method)
                yield message
                relayed += 1
                if relayed == cut:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, BROKEN)
        except aio.AioRpcError as exc:
            await _abort(context, exc)
        finally:
            call.cancel()


if TYPE_CHECKING:  # generic in the stubs only
    _RpcHandler = grpc.GenericRpcHandler[bytes, bytes]
else:
    _RpcHandler = grpc.GenericRpcHandler


class _Handler(_RpcHandler):
    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path: str = handler_call_details.method
        streaming = _server_streaming(path)
        if streaming is None:
            return None  # UNIMPLEMENTED, as the server would answer
        if streaming:
            # partial keeps them recognisable as async (a lambda would run in a thread).
            return grpc.unary_stream_rpc_method_handler(partial(self._proxy.stream, path))
        return grpc.unary_unary_rpc_method_handler(partial(self._proxy.unary, path))


def _bare(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _server_streaming(path: str) -> bool | None:
    """Whether `/package.Service/Method` streams its answer; None for unknown or client
    streaming methods (not relayed)."""
    service_name, _, method_name = path.lstrip("/").partition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    method = service.methods_by_name.get(method_name)
    if method is None or method.client_streaming:
        return None
    return bool(method.server_streaming)


def _forwarded(context: aio.ServicerContext[Any, Any]) -> dict[str, Any]:
    metadata = tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith(_HOP_METADATA)
    )
    return {"metadata": metadata, "timeout": context.time_remaining()}


async def _abort(context: aio.ServicerContext[Any, Any], exc: aio.AioRpcError) -> NoReturn:
    metadata: Any = exc.trailing_metadata()  # an aio.Metadata; the stubs say otherwise
    trailers = tuple((key, value) for key, value in metadata or ())
    await context.abort(exc.code(), exc.details() or "", trailers)
