"""In-process fan-out of committed events to the watchers of an operation.

Publishing happens after the transaction that wrote the event commits, so a watcher never sees an
event that storage does not have. Watchers treat the hub as a fast path only: a gap in what they
receive, a `None` (a poke: "something changed, re-read") or a quiet timeout sends them back to
storage, so a lost or reordered notification costs latency, never an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from runtime_service.domain import Event


class Subscription:
    def __init__(self, operation_id: str) -> None:
        self.operation_id = operation_id
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.closed = False

    def _put(self, item: Event | None) -> None:
        self._queue.put_nowait(item)

    def ready(self) -> list[Event | None]:
        """Everything already published and not yet taken, without waiting."""
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def next(self, quiet_seconds: float) -> Event | None:
        """The next published event, or None after a poke or `quiet_seconds` of quiet."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            async with asyncio.timeout(quiet_seconds):
                return await self._queue.get()
        except TimeoutError:
            return None


class EventHub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        # Newest seq published here, per watched operation (to recognise our own NOTIFYs).
        self._published: dict[str, int] = {}
        # Operations with a write of this process in flight, and the newest seq a notification
        # reported for each meanwhile (see writing).
        self._writing: dict[str, int] = {}
        self._poked_while_writing: dict[str, int] = {}
        self._closed = False
        # Told when an operation gets its first watcher here and loses its last (a PostgreSQL
        # replica listens on the operation's events channel meanwhile: notifications.py).
        self._on_watched: Callable[[str], object] = _nothing
        self._on_unwatched: Callable[[str], object] = _nothing

    def tell_watches(
        self, watched: Callable[[str], object], unwatched: Callable[[str], object]
    ) -> None:
        self._on_watched = watched
        self._on_unwatched = unwatched

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            subs = self._subscribers.get(event.operation_id)
            if not subs:
                continue
            if event.seq > self._published.get(event.operation_id, 0):
                self._published[event.operation_id] = event.seq
            for sub in subs:
                sub._put(event)

    def poke(self, operation_id: str, seq: int | None = None) -> None:
        """Wake the operation's watchers to re-read storage (an event was stored elsewhere).
        A poke for a seq this process already published is dropped: it was our own write."""
        subs = self._subscribers.get(operation_id)
        if not subs or (seq is not None and seq <= self._published.get(operation_id, 0)):
            return
        if seq is not None and operation_id in self._writing:
            # Most likely the notification of the write in flight, which beat its own publish
            # here; look again once that write has been published.
            seen = self._poked_while_writing.get(operation_id, 0)
            self._poked_while_writing[operation_id] = max(seen, seq)
            return
        for sub in subs:
            sub._put(None)

    def notified(self, operation_id: str, seq: int, event: Event | None) -> None:
        """Another replica's (or this one's) committed write, told by a notification: its
        event published here when the notification carries it (watchers skip what they have,
        and re-read storage at a gap), a poke otherwise."""
        if event is None:
            self.poke(operation_id, seq)
        elif seq > self._published.get(operation_id, 0):
            self.publish((event,))

    def writing(self, operation_id: str) -> None:
        """A write of this process whose events it publishes itself has begun (end it with
        `written`, in a `finally`): a notification for the operation arriving meanwhile waits
        for that publish instead of sending the operation's watchers back to storage (on
        PostgreSQL every write notifies, and the notification often arrives before the writer
        has published). Two plain calls rather than a context manager: the runner makes two or
        three writes a step, and a generator-based one cost more than this bookkeeping."""
        self._writing[operation_id] = self._writing.get(operation_id, 0) + 1

    def written(self, operation_id: str) -> None:
        left = self._writing.pop(operation_id) - 1
        if left:
            self._writing[operation_id] = left
        else:
            seq = self._poked_while_writing.pop(operation_id, None)
            if seq is not None:
                self.poke(operation_id, seq)  # dropped if that seq is published by now

    @contextmanager
    def local_write(self, operation_id: str) -> Iterator[None]:
        """`writing` and `written` around a block (for the writes off the per-step path)."""
        self.writing(operation_id)
        try:
            yield
        finally:
            self.written(operation_id)

    def close(self) -> None:
        """Shutdown: every watcher ends now (and tells its client to reconnect elsewhere)."""
        self._closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.closed = True
                sub._put(None)

    def poke_all(self) -> None:
        for operation_id in list(self._subscribers):
            self.poke(operation_id)

    @contextmanager
    def subscribe(self, operation_id: str) -> Iterator[Subscription]:
        sub = Subscription(operation_id)
        sub.closed = self._closed
        subs = self._subscribers.get(operation_id)
        if subs is None:
            subs = self._subscribers[operation_id] = set()
            self._on_watched(operation_id)
        subs.add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(operation_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[operation_id]
                    self._published.pop(operation_id, None)
                    self._on_unwatched(operation_id)

    def watcher_count(self, operation_id: str) -> int:
        return len(self._subscribers.get(operation_id, ()))


def _nothing(operation_id: str) -> None:
    return None
