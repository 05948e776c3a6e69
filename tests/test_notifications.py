"""PostgreSQL notifications between replicas: the events payload ("id:seq", or "id:seq:note"
carrying the event itself), and which replica hears which operation's events."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from runtime_service.app import RuntimeApp
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.notifications import (
    MAX_NOTE_BYTES,
    STOPS,
    Handlers,
    PostgresListener,
    event_note,
    events_channel,
    libpq_url,
    parse_event_payload,
)
from runtime_service.storage import utcnow
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config


def test_a_carried_event_round_trips_and_a_bare_payload_carries_none() -> None:
    op_id, now = str(uuid.uuid4()), utcnow()
    data = {"requested_by": "ana: ops", "reason": "stop: now", "cause": "USER"}
    note = event_note(EventKind.STOP_REQUESTED, data, now)
    parsed_id, seq, event = parse_event_payload(f"{op_id}:7:{note}")
    assert (parsed_id, seq) == (op_id, 7)
    assert event is not None
    assert (event.operation_id, event.seq, event.kind) == (op_id, 7, EventKind.STOP_REQUESTED)
    assert event.data == data and event.created_at == now
    assert parse_event_payload(f"{op_id}:8") == (op_id, 8, None)


def test_an_event_too_large_for_a_notification_is_not_carried() -> None:
    """PostgreSQL refuses a payload over 8000 bytes, which would fail the stop's own write."""
    wide = "é" * MAX_NOTE_BYTES  # two bytes each in UTF-8
    assert event_note(EventKind.STOP_REQUESTED, {"reason": wide}, utcnow()) == ""


# ---------------------------------------------------------------------- who hears which events


@contextlib.asynccontextmanager
async def two_replicas(postgres_url: str, gated: GatedAgent) -> AsyncIterator[list[RuntimeApp]]:
    """Two replicas on one database, listening; an hour's quiet before a watcher looks in
    storage, so that what a watch gets live it got through notifications."""
    config = runtime_config(postgres_url, watch_poll_seconds=3600.0)
    apps = [
        await RuntimeApp.open(config, registry(gated)),
        await RuntimeApp.open(config, registry(gated)),
    ]
    try:
        for app in apps:
            assert app.listener is not None
            await app.listener.connected.wait()
        yield apps
    finally:
        for app in reversed(apps):
            await app.close()


def recording_dispatch(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[tuple[str, str]]]:
    """Every notification each listener dispatches, by the listener's id()."""
    heard: dict[int, list[tuple[str, str]]] = {}
    dispatch = PostgresListener._dispatch

    def record(self: PostgresListener, channel: str, payload: str) -> None:
        heard.setdefault(id(self), []).append((channel, payload))
        dispatch(self, channel, payload)

    monkeypatch.setattr(PostgresListener, "_dispatch", record)
    return heard


async def test_a_replica_hears_the_events_of_the_operations_it_watches_and_no_others(
    postgres_url: str, gated: GatedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One replica runs an operation; the other hears none of its events until it has a
    watcher for it, then every one, live: with an hour's quiet before a watcher looks in
    storage, its watch reaches the terminal event only through notifications."""
    heard = recording_dispatch(monkeypatch)
    async with two_replicas(postgres_url, gated) as apps:
        created = await apps[0].operations.start("gated", {"steps": 3}, "")
        op_id = created.operation.id

        async def stored_through_step(step: int) -> int | None:
            """The newest seq once step `step` has emitted its chunk."""
            events = await apps[0].storage.events_after(op_id, 0)
            chunks = [e for e in events if e.kind is EventKind.OUTPUT_CHUNK]
            return events[-1].seq if len(chunks) > step else None

        await eventually(lambda: stored_through_step(0))  # claimed: by either replica
        watching = apps[1] if apps[0].runner.runs(op_id) else apps[0]
        assert watching.listener is not None and not watching.runner.runs(op_id)
        gated.release(op_id)  # step 0 ends; step 1 begins and emits: all while nobody watches
        before_watch = await eventually(lambda: stored_through_step(1))
        assert not watching.listener.listening(op_id)

        seen: list[Event] = []
        async with contextlib.aclosing(watching.operations.watch(op_id, 0)) as watch:
            async for event in watch:
                seen.append(event)
                if event.seq == before_watch:
                    await eventually(lambda: _listens(watching, op_id))  # it hears from now on
                    gated.release(op_id, 2)  # steps 1 and 2 end: the events from here are live
                if event.is_terminal:
                    break
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        assert seen[-1].kind is EventKind.COMPLETED

        watcher_heard = [
            parse_event_payload(payload)[1]
            for channel, payload in heard.get(id(watching.listener), [])
            if channel == events_channel(op_id) and parse_event_payload(payload)[0] == op_id
        ]
        # Nothing stored before the watch was sent to that replica; what came after was.
        assert watcher_heard and min(watcher_heard) > before_watch
        counted = watching.runner.metrics.notifications_heard["events"]._value.get()
        assert counted == len(watcher_heard)

        async def unwatched() -> bool:
            return not watching.listener.listening(op_id)  # type: ignore[union-attr]

        await eventually(unwatched)


async def test_no_notification_is_lost_while_the_watched_operations_change(
    postgres_url: str,
) -> None:
    """LISTEN needs the connection the wait for notifications holds, so the listener cancels
    that wait whenever an operation is watched or unwatched: notifications sent meanwhile all
    arrive, once each and in order."""
    stops: list[str] = []
    listening: list[str] = []
    listener = PostgresListener(
        postgres_url,
        Handlers(
            on_stop=stops.append,
            on_event=lambda op_id, seq, event: None,
            on_work=lambda: None,
            on_reconnect=lambda: None,
            on_listening=listening.append,
        ),
    )
    listener.start()
    try:
        await listener.connected.wait()
        import psycopg

        sent = [str(i) for i in range(400)]
        async with await psycopg.AsyncConnection.connect(
            libpq_url(postgres_url), autocommit=True
        ) as conn:
            watched: list[str] = []
            for i, payload in enumerate(sent):
                await conn.execute("SELECT pg_notify(%s, %s)", (STOPS, payload))
                if i % 4 == 0:
                    watched.append(str(uuid.uuid4()))
                    listener.watch(watched[-1])
                elif i % 4 == 2:
                    listener.unwatch(watched.pop(0))

        async def all_heard() -> bool:
            return len(stops) >= len(sent)

        await eventually(all_heard)
        assert stops == sent
        assert listening  # the watches took effect on the connection as they changed

        async def listening_on_the_watched() -> bool:
            return all(listener.listening(op_id) for op_id in watched)

        await eventually(listening_on_the_watched)
    finally:
        await listener.close()


def test_operations_share_256_event_channels_by_their_ids_first_hex_digits() -> None:
    """Bounded: PostgreSQL checks each notification against every channel a listener has, one
    by one, so a channel per operation cost a replica watching thousands of them more than it
    saved."""
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    channels = {events_channel(op_id) for op_id in ids}
    assert len(channels) <= 256
    assert all(len(channel) <= 63 for channel in channels)  # PostgreSQL's limit for a name
    assert events_channel(ids[0]) == events_channel(ids[0][:2] + str(uuid.uuid4())[2:])


async def test_a_channel_two_watched_operations_share_is_listened_on_until_both_go(
    postgres_url: str,
) -> None:
    listener = PostgresListener(
        postgres_url,
        Handlers(
            on_stop=lambda op_id: None,
            on_event=lambda op_id, seq, event: None,
            on_work=lambda: None,
            on_reconnect=lambda: None,
        ),
    )
    listener.start()
    try:
        await listener.connected.wait()
        first = str(uuid.uuid4())
        second = first[:2] + str(uuid.uuid4())[2:]  # the same channel
        listener.watch(first)
        listener.watch(second)

        async def listens() -> bool:
            return listener.listening(first)

        await eventually(listens)
        listener.unwatch(first)  # `second` still shares the channel
        elsewhere = ("00" if first[:2] != "00" else "ff") + str(uuid.uuid4())[2:]
        listener.watch(elsewhere)

        async def both() -> bool:
            return listener.listening(second) and listener.listening(elsewhere)

        await eventually(both)
        listener.unwatch(second)

        async def gone() -> bool:
            return not listener.listening(second)

        await eventually(gone)
    finally:
        await listener.close()


async def test_a_replica_does_not_listen_for_the_operations_its_runner_runs(
    postgres_url: str, gated: GatedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica that runs an operation streams it (the routed shape): its runner publishes
    the events to the watchers there itself, so that replica listens on no events channel for
    it; a stop recorded on the other replica reaches its watchers on the stops channel, its
    `stop_requested` event carried, with no read of storage on the stop's path."""
    async with two_replicas(postgres_url, gated) as apps:
        op_id, runs, other = await _running_on_one(apps)
        assert runs.runner.runs(op_id) and runs.listener is not None
        reads: list[int] = []
        events_after = runs.storage.events_after

        async def counted(operation_id: str, after: int, limit: int = 500) -> list[Event]:
            reads.append(after)
            return await events_after(operation_id, after, limit)

        seen: list[Event] = []
        async with contextlib.aclosing(runs.operations.watch(op_id, 0)) as watch:
            async for event in watch:
                seen.append(event)
                if event.kind is EventKind.OUTPUT_CHUNK:
                    assert not runs.listener.listening(op_id)
                    monkeypatch.setattr(runs.storage, "events_after", counted)
                    await other.operations.interrupt(op_id, "ops", "enough")
                if event.is_terminal:
                    break
        kinds = [e.kind for e in seen[-2:]]
        assert kinds == [EventKind.STOP_REQUESTED, EventKind.INTERRUPTED]
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        assert reads == []  # both came live: the stop's event on the stops channel
        heard = runs.runner.metrics.notifications_heard
        assert heard["events"]._value.get() == 0 and heard["stops"]._value.get() >= 1


async def _running_on_one(apps: list[RuntimeApp]) -> tuple[str, RuntimeApp, RuntimeApp]:
    """A gated operation started on the first replica and emitting its first step's chunk,
    claimed by either: its id, the replica that runs it, and the other."""
    created = await apps[0].operations.start("gated", {"steps": 3}, "")
    op_id = created.operation.id
    await eventually(lambda: _emitted(apps[0], op_id))
    runs, other = apps if apps[0].runner.runs(op_id) else apps[::-1]
    return op_id, runs, other


async def _emitted(app: RuntimeApp, operation_id: str) -> bool:
    events = await app.storage.events_after(operation_id, 0)
    return any(e.kind is EventKind.OUTPUT_CHUNK for e in events)


async def _listens(app: RuntimeApp, operation_id: str) -> bool:
    return app.listener is not None and app.listener.listening(operation_id)


async def test_a_stop_recorded_by_the_runners_own_replica_wakes_no_other_replica(
    postgres_url: str, gated: GatedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded where the operation runs (the routed shape), a stop is handed to the runner
    in-process and sends nothing on the stops channel, which every replica hears; a watcher on
    the other replica still gets the stop's event (on the operation's events channel) and the
    halt. A stop recorded on the other replica does go out on the stops channel (the
    counterpart, above). The absence is checked against a later notification on the same
    channel: PostgreSQL delivers them in commit order, so one sent by the stop would be heard
    first."""
    heard = recording_dispatch(monkeypatch)
    async with two_replicas(postgres_url, gated) as apps:
        op_id, runs, other = await _running_on_one(apps)
        seen: list[Event] = []
        async with contextlib.aclosing(other.operations.watch(op_id, 0)) as watch:
            async for event in watch:
                seen.append(event)
                if event.kind is EventKind.OUTPUT_CHUNK:
                    await eventually(lambda: _listens(other, op_id))
                    await runs.operations.interrupt(op_id, "ops", "enough")
                if event.is_terminal:
                    break
        assert [e.kind for e in seen[-2:]] == [EventKind.STOP_REQUESTED, EventKind.INTERRUPTED]
        await _nothing_on_the_stops_channel(postgres_url, heard, (runs, other))


async def test_a_pause_recorded_by_the_runners_own_replica_wakes_no_other_replica(
    postgres_url: str, gated: GatedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a stop: a pause recorded where the operation runs is handed to that runner in-process
    and sends nothing on the stops channel, and the step is cut and the operation PAUSED all
    the same. (A pause recorded on the other replica travels on the stops channel:
    tests/test_waiting_replicas.py.) Checked against a later sentinel, as above."""
    heard = recording_dispatch(monkeypatch)
    async with two_replicas(postgres_url, gated) as apps:
        op_id, runs, other = await _running_on_one(apps)
        await runs.operations.pause(op_id, "ops")

        async def paused() -> bool:
            operation = await runs.storage.get(op_id)
            return operation is not None and operation.status is OperationStatus.PAUSED

        await eventually(paused)
        await _nothing_on_the_stops_channel(postgres_url, heard, (runs, other))


async def _nothing_on_the_stops_channel(
    postgres_url: str, heard: dict[int, list[tuple[str, str]]], apps: tuple[RuntimeApp, ...]
) -> None:
    """No replica heard anything on the stops channel: checked against a sentinel sent there
    now, which PostgreSQL delivers after anything sent before it (in commit order)."""
    import psycopg

    sentinel = str(uuid.uuid4())
    async with await psycopg.AsyncConnection.connect(
        libpq_url(postgres_url), autocommit=True
    ) as conn:
        await conn.execute("SELECT pg_notify(%s, %s)", (STOPS, sentinel))
    assert all(app.listener is not None for app in apps)

    async def sentinel_heard() -> bool:
        return all((STOPS, sentinel) in heard.get(id(app.listener), []) for app in apps)

    await eventually(sentinel_heard)
    for app in apps:
        stops = [payload for channel, payload in heard[id(app.listener)] if channel == STOPS]
        assert stops == [sentinel]
