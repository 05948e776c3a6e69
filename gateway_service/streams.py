"""The client streams this gateway serves, by operation, and what flows through them.

A stream's queue merges the runtime's durable events with the gateway's own notices (a stop was
accepted, a stop could not be delivered), so a notice reaches every local client of the operation
at once, without waiting for the runtime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from stopline.events import TERMINAL_EVENT_KINDS
from stopline.v1 import operation_pb2 as op_pb


@dataclass(frozen=True, slots=True)
class EventItem:
    event: op_pb.Event

    @property
    def is_terminal(self) -> bool:
        return self.event.WhichOneof("kind") in TERMINAL_EVENT_KINDS


@dataclass(frozen=True, slots=True)
class StopRequestedItem:
    requested_by: str
    reason: str
    # When the gateway accepted the stop (monotonic): the client's view of the stop's duration
    # runs from here to the terminal event forwarded on its stream (metrics).
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class StopUndeliveredItem:
    reason: str
    attempts: int


StreamItem = EventItem | StopRequestedItem | StopUndeliveredItem


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The operation had already ended and nothing comes after the stream's cursor (a reconnect
    from the terminal event's seq): the stream ends cleanly, without a terminal event to send."""


class ClientStream:
    def __init__(self, operation_id: str) -> None:
        self.operation_id = operation_id
        self.queue: asyncio.Queue[StreamItem | StreamEnd | BaseException] = asyncio.Queue()

    def put(self, item: StreamItem | StreamEnd | BaseException) -> None:
        self.queue.put_nowait(item)


class StreamRegistry:
    def __init__(self) -> None:
        self._streams: dict[str, set[ClientStream]] = {}
        self.open_count = 0  # read by the metrics' scrape thread: an int, never the dict

    @contextmanager
    def open(self, operation_id: str) -> Iterator[ClientStream]:
        stream = ClientStream(operation_id)
        self._streams.setdefault(operation_id, set()).add(stream)
        self.open_count += 1
        try:
            yield stream
        finally:
            self.open_count -= 1
            streams = self._streams.get(operation_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[operation_id]

    def notify(self, operation_id: str, item: StreamItem) -> int:
        """Push a notice to every local stream of the operation; returns how many got it."""
        streams = self._streams.get(operation_id, ())
        for stream in streams:
            stream.put(item)
        return len(streams)

    def count(self, operation_id: str) -> int:
        return len(self._streams.get(operation_id, ()))
