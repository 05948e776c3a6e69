"""The streaming baseline: a bare grpc.aio server-streaming handler, one hop, no storage.

It serves GatewayService.StreamOperation by replaying pre-recorded responses from a file (the
same messages the gateway sends for the benchmark's operation, so message sizes match).
Usage: python -m bench.raw_server PORT MESSAGES_FILE
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from grpc import aio

from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc


def load(path: Path) -> list[gw.StreamOperationResponse]:
    data = path.read_bytes()
    messages = []
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        messages.append(gw.StreamOperationResponse.FromString(data[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    return messages


def save(path: Path, messages: list[gw.StreamOperationResponse]) -> None:
    with path.open("wb") as out:
        for message in messages:
            raw = message.SerializeToString()
            out.write(len(raw).to_bytes(4, "big") + raw)


class Replay(gw_grpc.GatewayServiceServicer):
    def __init__(self, messages: list[gw.StreamOperationResponse]) -> None:
        self._messages = messages

    async def StreamOperation(  # type: ignore[override]
        self, request: gw.StreamOperationRequest, context: Any
    ) -> AsyncGenerator[gw.StreamOperationResponse, None]:
        for message in self._messages:
            yield message


async def main(port: int, path: Path) -> None:
    server = aio.server()
    gw_grpc.add_GatewayServiceServicer_to_server(Replay(load(path)), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
