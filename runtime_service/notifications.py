"""Cross-replica signals over PostgreSQL LISTEN/NOTIFY.

Replicas sharing one database tell each other three things, each sent inside the transaction that
makes it true (PostgreSQL delivers a NOTIFY only when its transaction commits):
- `stopline_stops` (payload: operation id, or "id:seq:note" carrying the `stop_requested`
  event): a stop of a running operation was recorded by a replica that does not run it; its
  runner cancels the step now, and the replica's watchers get the event. (The replica that runs
  it hands a stop recorded there to its runner in-process and sends nothing here: see
  Storage.record_stop's `runner_here`.) A pause travels the same way, its payload marked
  (`pause_payload`), and likewise only from another replica (Storage.pause's `runner_here`):
  the runner cuts the step and pauses the operation instead of halting it.
- `stopline_events_<bucket>` (payload: "id:seq", or "id:seq:note"): an event of an operation
  was stored; local watchers re-read storage, or, when the payload carries the event itself
  (`event_note`: a stop's `stop_requested`, which another replica's watchers need before the
  terminal event their own runner writes next), take it from the hub without a read.
- `stopline_work` (no payload): an operation became claimable; replicas with room claim it.

Events go on one of 256 channels, chosen by the operation id's first two hex digits, and a
replica listens only on the channels of the operations it has watchers for and does not run
itself (`PostgresListener.watch`, `owned`): the events of an operation its runner runs, the
runner publishes here; those another replica writes for it meanwhile are a stop's (carried on
the stops channel) and a pause's (whose watchers read it at the gap the runner's next event
leaves). On one shared channel every replica was woken by every event of
every operation (two per step, and one per output chunk), watched there or not, and a runtime
with no watchers at all took each of its own events back from the database. A channel per
operation would be the most selective, but PostgreSQL checks each notification against every
channel a listener has, one by one: at 10,000 channels that cost a listening server process
32 µs per notification sent by anyone (1 µs at 256: `python -m bench.pg_channels`).

Notifications are a fast path, never the only one: a listener that loses its connection
reconnects with backoff and then asks for a full re-check (`on_reconnect`); an operation's
channel is listened on a moment after its first watcher subscribes, so the watchers are sent back
to storage once it is (`on_listening`); and the runner polls stop intents and claimable work,
and watchers re-read storage after a quiet spell, anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from runtime_service.domain import Event, EventKind, JSONValue
from stopline.json_values import dump_json

log = logging.getLogger(__name__)

STOPS = "stopline_stops"
EVENTS_PREFIX = "stopline_events_"
WORK = "stopline_work"

# How many hex digits of an operation id name its events channel: 256 channels.
BUCKET_DIGITS = 2
_BUCKET = re.compile(f"[0-9a-f]{{{BUCKET_DIGITS}}}")
PAUSE_MARK = "pause:"


def events_channel(operation_id: str) -> str:
    """The channel of an operation's events (operation ids are UUIDs: their first two hex
    digits spread operations evenly over the channels)."""
    return EVENTS_PREFIX + operation_id[:BUCKET_DIGITS]


def parse_stop_payload(payload: str) -> tuple[str, Event | None]:
    """A `stopline_stops` payload: the operation id (a pause's marked), and the stop's
    `stop_requested` event when carried ("id:seq:note", as an events payload)."""
    if payload.startswith(PAUSE_MARK) or ":" not in payload:
        return payload, None
    op_id, _, event = parse_event_payload(payload)
    return op_id, event


def pause_payload(operation_id: str) -> str:
    """The `stopline_stops` payload of a pause (a stop's is the bare operation id)."""
    return PAUSE_MARK + operation_id


def notify(conn: Connection, channel: str, payload: str = "") -> None:
    """Queue a notification in the current transaction (no-op on backends without NOTIFY)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(channel, payload)))


MAX_NOTE_BYTES = 4000
"""The largest event a notification carries (PostgreSQL's limit for a whole payload is 8000
bytes); a larger one is announced as "id:seq", and its watchers read it."""


def event_note(kind: EventKind, data: dict[str, JSONValue], at: datetime) -> str:
    """An event's kind, data and time for an events payload (its operation id and seq
    are the payload's "id:seq:" prefix, which the statement writes); '' when too large."""
    note = dump_json({"kind": kind.value, "data": data, "at": at.isoformat()})
    return note if len(note.encode()) <= MAX_NOTE_BYTES else ""


def parse_event_payload(payload: str) -> tuple[str, int, Event | None]:
    """An events payload: the operation id, the seq, and the event when carried.
    (Operation ids are UUIDs: the first two colons end the id and the seq.)"""
    op_id, _, rest = payload.partition(":")
    seq_text, _, note = rest.partition(":")
    seq = int(seq_text)
    if not note:
        return op_id, seq, None
    fields = json.loads(note)
    at = datetime.fromisoformat(fields["at"])
    return op_id, seq, Event(op_id, seq, EventKind(fields["kind"]), fields["data"], at)


def libpq_url(sqlalchemy_url: str) -> str:
    """postgresql+psycopg://... -> postgresql://... for a raw psycopg connection."""
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


@dataclass(frozen=True)
class Handlers:
    on_stop: Callable[[str], object]
    on_event: Callable[[str, int, Event | None], object]
    on_work: Callable[[], object]
    on_reconnect: Callable[[], object]
    # An operation's channel is listened on now: what was stored before may have gone unheard.
    on_listening: Callable[[str], object] = lambda operation_id: None
    # A notification arrived on "stops", "events" or "work" (counted by the metrics).
    on_heard: Callable[[str], object] = lambda channel: None


class PostgresListener:
    """One dedicated connection LISTENing on the stops and work channels for the life of the
    runtime, and on the events channel of each operation watched here and run elsewhere while
    it is."""

    def __init__(self, database_url: str, handlers: Handlers) -> None:
        self._conninfo = libpq_url(database_url)
        self._handlers = handlers
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # Operations with watchers here, and those this replica's runner runs; the first but
        # not the second, by the channel of their events; the channels listened on now.
        self._watching: set[str] = set()
        self._here: set[str] = set()
        self._watched: dict[str, set[str]] = {}
        self._listening: set[str] = set()
        self._changed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postgres listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    def watch(self, operation_id: str) -> None:
        """The operation has a watcher here now: listen on its events' channel, unless this
        replica's runner runs it."""
        self._watching.add(operation_id)
        self._want(operation_id, operation_id not in self._here)

    def unwatch(self, operation_id: str) -> None:
        """Its last watcher here has gone."""
        self._watching.discard(operation_id)
        self._want(operation_id, False)

    def owned(self, operation_id: str, here: bool) -> None:
        """This replica's runner has claimed the operation (`here`), or no longer runs it: while
        it runs it, the runner publishes its events to the watchers here itself, and a stop
        recorded elsewhere brings its `stop_requested` event on the stops channel."""
        if here:
            self._here.add(operation_id)
            self._want(operation_id, False)
        else:
            self._here.discard(operation_id)
            self._want(operation_id, operation_id in self._watching)

    def _want(self, operation_id: str, wanted: bool) -> None:
        """Listen on the operation's channel (`wanted`), or not on its account."""
        channel = events_channel(operation_id)
        ops = self._watched.get(channel)
        if wanted:
            if not _BUCKET.fullmatch(channel.removeprefix(EVENTS_PREFIX)):
                return  # not an operation id (which the watch refuses anyway): nothing to hear
            if ops is None:
                ops = self._watched[channel] = set()
            ops.add(operation_id)
            if len(ops) == 1:
                self._changed.set()
        elif ops is not None and operation_id in ops:
            ops.discard(operation_id)
            if not ops:
                del self._watched[channel]
                self._changed.set()

    def listening(self, operation_id: str) -> bool:
        """Whether the connection listens on the operation's events channel now."""
        return events_channel(operation_id) in self._listening

    async def _run(self) -> None:
        # Imported here: psycopg is the `postgres` extra, and SQLite deployments never get here.
        import psycopg

        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
            retry=retry_if_exception_type(psycopg.OperationalError),
            before_sleep=lambda state: log.warning(
                "notification connection lost (%s); reconnecting",
                state.outcome.exception() if state.outcome else "?",
            ),
        )
        async for attempt in retrying:
            with attempt:
                await self._listen()

    async def _listen(self) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
            self._listening.clear()
            await conn.execute(f"LISTEN {STOPS}; LISTEN {WORK}")
            await self._follow_watches(conn)
            self.connected.set()
            # Anything sent while we were not listening is found by a full re-check.
            self._handlers.on_reconnect()
            try:
                while True:
                    await self._receive_until_changed(conn)
                    await self._follow_watches(conn)
            finally:
                self.connected.clear()

    async def _receive_until_changed(self, conn: Any) -> None:
        """Dispatch notifications until the set of watched operations changes. LISTEN needs the
        connection that `notifies()` holds while it waits, so the wait is cancelled then (it
        waits with no query in progress: nothing is lost, see tests/test_notifications.py)."""
        if self._watched.keys() != self._listening:
            return
        self._changed.clear()
        receiving = asyncio.create_task(self._receive(conn), name="postgres notifications")
        changed = asyncio.create_task(self._changed.wait())
        try:
            await asyncio.wait({receiving, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if not receiving.done():
                receiving.cancel()
                await asyncio.wait({receiving})
        if not receiving.cancelled():
            receiving.result()  # the connection's failure, if that is what ended it

    async def _receive(self, conn: Any) -> None:
        async for note in conn.notifies():
            self._dispatch(note.channel, note.payload)

    async def _follow_watches(self, conn: Any) -> None:
        """LISTEN on the channels of operations newly watched, UNLISTEN on those no longer."""
        wanted = set(self._watched)
        start = wanted - self._listening
        stop = self._listening - wanted
        if not start and not stop:
            return
        commands = [f'LISTEN "{channel}"' for channel in sorted(start)]
        commands += [f'UNLISTEN "{channel}"' for channel in sorted(stop)]
        await conn.execute("; ".join(commands))
        self._listening = wanted
        for channel in start:
            for op_id in list(self._watched.get(channel, ())):
                self._handlers.on_listening(op_id)

    def _dispatch(self, channel: str, payload: str) -> None:
        handlers = self._handlers
        try:
            if channel == STOPS:
                handlers.on_heard("stops")
                handlers.on_stop(payload)
            elif channel.startswith(EVENTS_PREFIX):
                handlers.on_heard("events")
                handlers.on_event(*parse_event_payload(payload))
            elif channel == WORK:
                handlers.on_heard("work")
                handlers.on_work()
        except Exception:
            log.exception("bad notification on %s: %r", channel, payload)
