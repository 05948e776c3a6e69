"""The principal the authentication interceptor sets is the call's own: many calls at once, unary
and streaming, each with its own credential, each see theirs in the handler, and nothing is left
over for a call after them. (The interceptor sets it in the call's task, with no wrapper around
the behaviour: this is what that relies on in grpc.aio.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from stopline.authn import AuthInterceptor, Metadata, bearer_token
from stopline.caller import principal_var

NOBODY = b"(nobody)"


def principal_of(metadata: Metadata) -> str:
    return f"principal-of-{bearer_token(metadata)}"


def seen() -> bytes:
    return principal_var.get(NOBODY.decode()).encode()


async def check(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(0)  # the other calls run here
    return seen()


async def watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(3):
        await asyncio.sleep(0)
        yield seen()


async def test_each_call_sees_its_own_principal_and_none_leaks() -> None:
    server = aio.server(interceptors=[AuthInterceptor(principal_of, "test")])
    methods = {
        "Check": grpc.unary_unary_rpc_method_handler(check),
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", methods),))
    # An exempt method (health's prefix) runs with no credentials and so with no principal.
    exempt = {"Check": grpc.unary_unary_rpc_method_handler(check)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", exempt),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Echo/Check", None, None)
            streaming = channel.unary_stream("/test.Echo/Watch", None, None)

            async def as_caller(n: int) -> list[bytes]:
                metadata = (("authorization", f"Bearer token-{n}"),)
                answers = [await unary(b"", metadata=metadata)]
                answers += [answer async for answer in streaming(b"", metadata=metadata)]
                return answers

            answers = await asyncio.gather(*(as_caller(n) for n in range(100)))
            assert answers == [[f"principal-of-token-{n}".encode()] * 4 for n in range(100)]
            assert (
                await channel.unary_unary("/grpc.health.v1.Health/Check", None, None)(b"") == NOBODY
            )
    finally:
        await server.stop(grace=None)
