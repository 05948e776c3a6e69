"""Watches: an operation's stored events after a seq, then its live ones, until the terminal
event; also the watch of an operation a start has just created (StartAndWatchOperation).

Subscribing to the hub before reading storage means no event can fall between the replay and
the live follow. A watch that begins with its start subscribes before the operation is published
or submitted to the runner, so it knows every event from the first one on and needs no read of
storage unless the live sequence shows a gap.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence

from runtime_service.domain import Event
from runtime_service.hub import EventHub, Subscription
from runtime_service.retention import events_expired
from runtime_service.storage import Storage
from stopline.errors import InvalidArgument, OutOfRange, Unavailable, operation_not_found
from stopline.ids import parse_operation_id

REPLAY_BATCH = 500


class Watches:
    def __init__(self, storage: Storage, hub: EventHub, poll_seconds: float) -> None:
        self.storage = storage
        self.hub = hub
        self.poll_seconds = poll_seconds

    async def batches(
        self, operation_id: str, after_seq: int
    ) -> AsyncGenerator[Sequence[Event], None]:
        """Each list holds the events that were ready together (a page of the replay, or the
        live events published since the last one was sent)."""
        op_id = parse_operation_id(operation_id)
        if after_seq < 0:
            raise InvalidArgument("after_seq", f"must not be negative, got {after_seq}")
        with self.hub.subscribe(op_id) as live:
            operation = await self.storage.get(op_id)
            if operation is None:
                raise operation_not_found(op_id)
            if after_seq > operation.last_seq:
                raise OutOfRange(
                    "after_seq",
                    f"is {after_seq} but the operation's newest event is {operation.last_seq}",
                )
            # From its last seq a watch wants nothing, expired or not: it ends at once, as for
            # any operation that had ended there.
            if operation.events_expired_at is not None and after_seq < operation.last_seq:
                raise events_expired(operation)
            follow = self._follow(
                op_id, live, after_seq, operation.status.is_terminal, operation.last_seq
            )
            async for batch in follow:
                yield batch

    async def from_start(
        self, first: Sequence[Event], launch: Callable[[], None]
    ) -> AsyncGenerator[Sequence[Event], None]:
        """The watch of an operation this call has just created, whose events so far are
        `first` (seq 1 on): subscribed before `launch` publishes them and lets the operation
        run, so the first step's events come live."""
        op_id = first[0].operation_id
        with self.hub.subscribe(op_id) as live:
            launch()
            yield first
            if first[-1].is_terminal:
                return
            follow = self._follow(op_id, live, first[-1].seq, False, 0, read_first=False)
            async for batch in follow:
                yield batch

    async def _follow(
        self,
        op_id: str,
        live: Subscription,
        cursor: int,
        finished: bool,
        last_seq: int,
        read_first: bool = True,
    ) -> AsyncGenerator[Sequence[Event], None]:
        """Replay from storage after `cursor`, then follow live until a gap, a poke or a quiet
        spell sends it back to storage; `read_first` False starts with the live follow.
        `finished`/`last_seq`: the operation had ended at `last_seq` when the watch began."""
        while True:
            if read_first:
                page = await self.storage.events_after(op_id, cursor, REPLAY_BATCH)
                if finished and _short_of(page, cursor, last_seq, REPLAY_BATCH):
                    # Retention began deleting its events during this replay.
                    expired = await self.storage.get(op_id)
                    if expired is not None and expired.events_expired_at is not None:
                        raise events_expired(expired)
                for end, event in enumerate(page, 1):
                    if event.is_terminal:
                        yield page[:end]
                        return
                if page:
                    yield page
                    cursor = page[-1].seq
                if len(page) == REPLAY_BATCH:
                    continue
                if finished:
                    return  # replayed a finished operation to its end
            read_first = True
            if live.closed:
                raise Unavailable(
                    f"the runtime is shutting down; reconnect with after_seq={cursor}"
                )
            # Caught up with storage: follow live until a gap, a poke or a quiet spell.
            while not live.closed:
                pushed = await live.next(self.poll_seconds)
                if pushed is None:
                    break
                batch, back_to_storage = _next_in_order([pushed, *live.ready()], cursor)
                if batch:
                    yield batch
                    cursor = batch[-1].seq
                    if batch[-1].is_terminal:
                        return
                if back_to_storage:
                    break


def _short_of(page: Sequence[Event], cursor: int, last_seq: int, limit: int) -> bool:
    """Whether a replay page of an ended operation misses events: a gap in it, or an end short
    of the operation's last seq."""
    if page and page[-1].seq - cursor != len(page):
        return True
    return len(page) < limit and (page[-1].seq if page else cursor) < last_seq


def _next_in_order(items: list[Event | None], cursor: int) -> tuple[list[Event], bool]:
    """The events that continue the sequence after `cursor`, up to the first terminal one, and
    whether storage must be re-read (a poke, or a gap: something was published out of order)."""
    batch: list[Event] = []
    for item in items:
        if item is None:
            return batch, True
        if item.seq <= cursor:
            continue  # already sent (replayed before it was published)
        if item.seq != cursor + 1:
            return batch, True
        batch.append(item)
        cursor = item.seq
        if item.is_terminal:
            break
    return batch, False
