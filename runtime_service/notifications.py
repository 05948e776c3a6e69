"""Cross-replica signals over PostgreSQL LISTEN/NOTIFY.

Replicas sharing one database tell each other three things, each sent inside the transaction that
makes it true (PostgreSQL delivers a NOTIFY only when its transaction commits):
- `stopline_stops` (payload: operation id): a stop was recorded; its runner cancels the step now.
  A pause travels the same way, its payload marked (`pause_payload`): the runner cuts the step
  and pauses the operation instead of halting it.
- `stopline_events` (payload: "id:seq", or "id:seq:note"): an event was stored; local watchers
  re-read storage, or, when the payload carries the event itself (`event_note`: a stop's
  `stop_requested`, which another replica's watchers need before the terminal event their own
  runner writes next), take it from the hub without a read.
- `stopline_work` (no payload): an operation became claimable; replicas with room claim it.

Notifications are a fast path, never the only one: a listener that loses its connection
reconnects with backoff and then asks for a full re-check (`on_reconnect`), and the runner polls
stop intents and claimable work periodically anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from runtime_service.domain import Event, EventKind, JSONValue
from stopline.json_values import dump_json

log = logging.getLogger(__name__)

STOPS = "stopline_stops"
EVENTS = "stopline_events"
WORK = "stopline_work"


PAUSE_MARK = "pause:"


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
    """An event's kind, data and time for a `stopline_events` payload (its operation id and seq
    are the payload's "id:seq:" prefix, which the statement writes); '' when too large."""
    note = dump_json({"kind": kind.value, "data": data, "at": at.isoformat()})
    return note if len(note.encode()) <= MAX_NOTE_BYTES else ""


def parse_event_payload(payload: str) -> tuple[str, int, Event | None]:
    """A `stopline_events` payload: the operation id, the seq, and the event when carried.
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


class PostgresListener:
    """One dedicated connection LISTENing on the three channels, for the life of the runtime."""

    def __init__(self, database_url: str, handlers: Handlers) -> None:
        self._conninfo = libpq_url(database_url)
        self._handlers = handlers
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postgres listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

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
            for channel in (STOPS, EVENTS, WORK):
                await conn.execute(f"LISTEN {channel}")
            self.connected.set()
            # Anything sent while we were not listening is found by a full re-check.
            self._handlers.on_reconnect()
            try:
                async for note in conn.notifies():
                    self._dispatch(note.channel, note.payload)
            finally:
                self.connected.clear()

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            if channel == STOPS:
                self._handlers.on_stop(payload)
            elif channel == EVENTS:
                self._handlers.on_event(*parse_event_payload(payload))
            elif channel == WORK:
                self._handlers.on_work()
        except Exception:
            log.exception("bad notification on %s: %r", channel, payload)
