"""Following an operation's events on the runtime for one client stream, resumed after breaks.

A stream never shows a gap or a repeat: the runtime watch is resumed from the last forwarded seq
whenever the runtime connection breaks, for up to `reconnect_deadline_seconds` without progress
(every watch that forwarded something starts a fresh window). The runtime's events and this
gateway's own notices (streams.py) reach the client through the same queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay

from gateway_service.runtime_link import RuntimeLink, backoff, is_retryable
from gateway_service.streams import (
    EventItem,
    StopRequestedItem,
    StreamEnd,
    StreamItem,
    StreamRegistry,
)
from stopline.events import TERMINAL_EVENT_KINDS
from stopline.grpc_status import UpstreamError
from stopline.limits import idle_stream_error
from stopline.v1 import operation_pb2 as op_pb

FINISHED = (
    op_pb.OPERATION_STATUS_COMPLETED,
    op_pb.OPERATION_STATUS_FAILED,
    op_pb.OPERATION_STATUS_INTERRUPTED,
)

Put = Callable[[StreamItem | StreamEnd | BaseException], None]


class LostAfter(Exception):
    """The runtime watch broke after forwarding events up to `seq`: resume from there, with a
    fresh retry window."""

    def __init__(self, seq: int) -> None:
        super().__init__(f"the runtime watch was lost after seq {seq}")
        self.seq = seq


class Follower:
    def __init__(
        self,
        link: RuntimeLink,
        streams: StreamRegistry,
        idle_seconds: float,
        reconnect_deadline_seconds: float,
        on_stop_seen: Callable[[float], None] | None = None,
        on_event_sent: Callable[[float], None] | None = None,
    ) -> None:
        self.link = link
        # Told, per stream, the seconds from a stop this gateway accepted to the terminal event
        # forwarded after it (the metrics).
        self.on_stop_seen = on_stop_seen
        # Told, per event sent to a client, its lag: from the later of the event's stored time
        # (the runtime's clock) and the stream's opening (a replayed history is not lag) to
        # the client's stream taking it (the metrics).
        self.on_event_sent = on_event_sent
        self.streams = streams
        # 0: no idle limit.
        self.idle_seconds = idle_seconds
        self.reconnect_deadline_seconds = reconnect_deadline_seconds

    async def follow(
        self, op_id: str, after_seq: int, source: AsyncGenerator[op_pb.Event, None] | None = None
    ) -> AsyncGenerator[StreamItem, None]:
        """The operation's events after `after_seq` and the local notices, until its terminal
        event (or at once for an operation that had ended at `after_seq`). `source`: the events
        after `after_seq` of a runtime stream already open (an unheld start's), read before any
        watch of this follower's own; once it breaks, the follower resumes from the last seq it
        forwarded, as after any broken watch."""
        idle = self.idle_seconds or None
        cursor = after_seq
        stop_at: float | None = None
        sent = self.on_event_sent
        opened = time.time()
        with self.streams.open(op_id) as stream:
            pump = asyncio.create_task(self._pump(op_id, after_seq, stream.put, source))
            try:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            item = await stream.queue.get()
                    except TimeoutError:
                        raise idle_stream_error(self.idle_seconds, cursor) from None
                    if isinstance(item, StreamEnd):
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, StopRequestedItem) and stop_at is None:
                        stop_at = item.at
                    if isinstance(item, EventItem):
                        if sent is not None:
                            at = item.event.time
                            stored = at.seconds + at.nanos * 1e-9
                            sent(max(0.0, time.time() - max(stored, opened)))
                        cursor = item.event.seq
                        if item.is_terminal:
                            if stop_at is not None and self.on_stop_seen is not None:
                                self.on_stop_seen(time.monotonic() - stop_at)
                            return
            finally:
                pump.cancel()

    async def _pump(
        self,
        op_id: str,
        after_seq: int,
        put: Put,
        source: AsyncGenerator[op_pb.Event, None] | None = None,
    ) -> None:
        """Forward the runtime's events, resuming from the last one after a broken connection."""
        cursor = after_seq
        # Read once: every later attempt opens a watch of its own from its cursor.
        first = [source] if source is not None else []
        deadline = self.reconnect_deadline_seconds
        while True:
            retrying = AsyncRetrying(
                stop=stop_after_delay(deadline),
                wait=backoff(1.0),
                retry=retry_if_exception(is_retryable),
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        opened = first.pop() if first else None
                        cursor = await self._forward(op_id, cursor, put, opened)
                return
            except LostAfter as lost:
                cursor = lost.seq
            except UpstreamError as exc:
                if is_retryable(exc):
                    exc = UpstreamError(
                        exc.code,
                        f"lost the runtime for {deadline:g}s ({exc.details}); "
                        f"reconnect with after_seq={cursor}",
                    )
                put(exc)
                return

    async def _forward(
        self,
        op_id: str,
        cursor: int,
        put: Put,
        source: AsyncGenerator[op_pb.Event, None] | None = None,
    ) -> int:
        """One runtime watch from `cursor` (`source`, when given, is one already open from
        there) until the terminal event (or, for an operation that had ended at `cursor`
        already, until the runtime's empty answer); returns the last seq."""
        start = cursor
        try:
            async with aclosing(source or self.link.watch(op_id, cursor)) as events:
                async for event in events:
                    if event.seq <= cursor:
                        continue
                    put(EventItem(event))
                    cursor = event.seq
                    if event.WhichOneof("kind") in TERMINAL_EVENT_KINDS:
                        return cursor
        except UpstreamError as exc:
            if is_retryable(exc) and cursor > start:
                raise LostAfter(cursor) from exc
            raise
        # Ended without a terminal event: the runtime shut down gracefully (resume), or the
        # operation had ended before the cursor, which only the operation itself tells apart.
        if cursor > start:
            raise LostAfter(cursor)
        operation = (await self.link.get(op_id)).operation
        if operation.status in FINISHED and operation.last_seq <= cursor:
            put(StreamEnd())
            return cursor
        raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "the runtime ended the stream early")
