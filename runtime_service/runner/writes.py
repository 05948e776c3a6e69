"""The runner's writes: each one's events are published to this process's watchers once it has
committed, and counted for the metrics and traces as they are."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from runtime_service import metrics, run_telemetry, stop_causes
from runtime_service.domain import Event, EventKind
from runtime_service.hub import EventHub
from runtime_service.runner.runs import Run
from runtime_service.storage import Appended

W = TypeVar("W")


class Writes:
    def __init__(self, hub: EventHub, meters: metrics.RuntimeMetrics, runs: dict[str, Run]) -> None:
        self.hub = hub
        self._metrics = meters
        self._runs = runs

    async def write(self, operation_id: str, write: Awaitable[W]) -> W:
        """A write of this runner, whose events are published here once it has committed."""
        hub = self.hub
        hub.writing(operation_id)
        try:
            written = await write
            self.publish(written)
        finally:
            hub.written(operation_id)
        return written

    def write_soon(
        self,
        operation_id: str,
        start: Callable[[], asyncio.Future[W]],
        then: Callable[[asyncio.Future[W]], None],
    ) -> asyncio.Future[W]:
        """`write` for a write made or queued by `start` (Storage.append_soon) with no coroutine
        around it: its events are published by a callback once it has committed (at once if it
        has), so it is published whether or not anybody awaits the future it returns. `then`
        runs in that same callback, after the publishing: one event loop callback a write
        rather than one for each party that wants to know (the step's events, its awaiter)."""
        hub = self.hub
        hub.writing(operation_id)
        try:
            written = start()
        except BaseException:
            hub.written(operation_id)
            raise

        def landed(done: asyncio.Future[W]) -> None:
            try:
                if not done.cancelled() and done.exception() is None:
                    self.publish(done.result())
            finally:
                hub.written(operation_id)
                then(done)

        if written.done():
            landed(written)
        else:
            written.add_done_callback(landed)
        return written

    def publish(self, events: Any) -> None:
        """The events a committed write reports (an Event, a list of them, or an Appended)."""
        if not events:
            return
        if isinstance(events, Appended):
            events = events.event
        events = [events] if isinstance(events, Event) else events
        self._count(events)
        self.hub.publish(events)

    def _count(self, events: list[Event]) -> None:
        """Metrics of committed events: counter increments only (no I/O, no lock)."""
        meters = self._metrics
        by_kind = meters.events.counts
        for event in events:
            by_kind[event.kind] += 1
            if event.is_terminal:
                run = self._runs.get(event.operation_id)
                cause = metrics.CAUSE_NONE
                if event.kind is EventKind.INTERRUPTED:
                    # The halt records the stop's cause; older stops have none.
                    recorded = event.data.get("cause") if isinstance(event.data, dict) else None
                    cause = stop_causes.label(recorded if isinstance(recorded, str) else None)
                    if cause == stop_causes.CAUSE_UNKNOWN and run is not None:
                        cause = run.cause
                agent = run.agent if run is not None else metrics.AGENT_UNKNOWN
                meters.finished.labels(agent, event.kind.value, cause).inc()
                run_telemetry.finished(event, cause, run.span if run is not None else None)
            elif event.kind in meters.tool_outcome:
                meters.tool_outcome[event.kind].inc()
