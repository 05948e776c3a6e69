"""A step's event writes while they are queued (the database thread busy, as at capacity): what
the agent awaiting one sees, what the runner's watchers see, and what close() waits for. The
writes' futures are settled by hand here, so every test sees the write still in flight."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pytest

from runtime_service import metrics
from runtime_service.domain import Event, EventKind, JSONValue
from runtime_service.hub import EventHub
from runtime_service.runner.writes import Writes
from runtime_service.step_events import DeltaSettings, OperationHalted, StepEvents
from runtime_service.storage import Appended, StorageError

OP = "op-1"


class QueuedStorage:
    """append_soon that queues every write: its future is settled by the test."""

    def __init__(self) -> None:
        self.queued: list[tuple[asyncio.Future[Appended | None], EventKind, dict[str, Any]]] = []
        self.seq = 0
        self.wrote = asyncio.Event()  # set once a write is queued

    def append_soon(
        self, operation_id: str, kind: EventKind, data: dict[str, JSONValue], *_: Any
    ) -> asyncio.Future[Appended | None]:
        future: asyncio.Future[Appended | None] = asyncio.get_running_loop().create_future()
        self.queued.append((future, kind, data))
        self.wrote.set()
        return future

    def land(self, index: int, *, stopping: bool = False) -> Event:
        future, kind, data = self.queued[index]
        self.seq += 1
        event = Event(OP, self.seq, kind, data, datetime.now(UTC))
        future.set_result(Appended(event, stopping=stopping))
        return event


@dataclass
class Step:
    """One step's events over queued writes, the hub its runner publishes to, and what the
    runner was told (a stop the writes found)."""

    storage: QueuedStorage = field(default_factory=QueuedStorage)
    hub: EventHub = field(default_factory=EventHub)
    stops: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        writes = Writes(self.hub, metrics.RuntimeMetrics(), {})
        self.events = StepEvents(
            operation_id=OP,
            step=0,
            runner_id="runner-1",
            storage=self.storage,  # type: ignore[arg-type]
            write_soon=partial(writes.write_soon, OP),
            stopped=lambda: bool(self.stops),
            on_stop=lambda: self.stops.append("told"),
            deltas=DeltaSettings(),
            tools=None,  # type: ignore[arg-type]
        )


async def test_an_emit_returns_once_its_queued_write_has_landed_and_been_published() -> None:
    step = Step()
    with step.hub.subscribe(OP) as watch:
        emit = asyncio.create_task(step.events.emit("hello"))
        await step.storage.wrote.wait()
        assert not emit.done()  # the write is still queued
        landed = step.storage.land(0)
        await emit
        # Published before the agent went on, in the same callback that woke it.
        assert watch.ready() == [landed]
    assert step.stops == []
    await step.events.close(stopping=False)


async def test_an_agent_cancelled_mid_emit_leaves_its_write_to_land_and_close_waits_for_it() -> (
    None
):
    step = Step()
    with step.hub.subscribe(OP) as watch:
        emit = asyncio.create_task(step.events.emit("cut"))
        await step.storage.wrote.wait()
        emit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await emit
        write = step.storage.queued[0][0]
        assert not write.done()  # the agent's cancellation did not reach the write
        closing = asyncio.create_task(step.events.close(stopping=True))
        for _ in range(5):  # turns of the loop, not time: close() runs as far as it can
            await asyncio.sleep(0)
        assert not closing.done()  # close() waits for the write in flight
        landed = step.storage.land(0)
        await closing
        assert watch.ready() == [landed]


async def test_a_queued_write_that_found_a_stop_tells_the_runner_when_it_lands() -> None:
    step = Step()
    emit = asyncio.create_task(step.events.emit("last words"))
    await step.storage.wrote.wait()
    step.storage.land(0, stopping=True)
    await emit  # stored: the stop came after it was allowed
    assert step.stops == ["told"]
    with pytest.raises(OperationHalted):
        await step.events.emit("after the stop")  # refused once the stop reached the step
    await step.events.close(stopping=True)


async def test_a_queued_write_that_fails_fails_the_emit_awaiting_it() -> None:
    step = Step()
    emit = asyncio.create_task(step.events.emit("doomed"))
    await step.storage.wrote.wait()
    step.storage.queued[0][0].set_exception(StorageError("the database is gone"))
    with pytest.raises(StorageError):
        await emit
    await step.events.close(stopping=False)
    assert step.stops == []
