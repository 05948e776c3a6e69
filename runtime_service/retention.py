"""Retention: the events and step records of operations that ended long enough ago are deleted,
so the database does not grow without bound; the operation rows (status, result, cause) stay.

The runtime sweeps every `interval` seconds: it takes its retention turn (one replica at a time,
see Storage.retention_turn), then deletes in small batches until nothing is left, yielding to
the event loop between batches, so the writes of running operations go on between them. A watch
of an operation whose events expired answers with `events_expired` (FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from runtime_service.domain import Operation
from runtime_service.metrics import RetentionMetrics
from runtime_service.storage import STORAGE_FAILURES, Storage, utcnow
from stopline.errors import FailedPrecondition

log = logging.getLogger(__name__)


def events_expired(operation: Operation) -> FailedPrecondition:
    """A watch of an operation whose events are gone: what it was, and where to look instead."""
    assert operation.events_expired_at is not None
    ended = (
        f" at {operation.finished_at.isoformat(timespec='seconds')}"
        if operation.finished_at is not None
        else ""
    )
    return FailedPrecondition(
        f"operation {operation.id} ended {operation.status.value}{ended}; its events expired "
        f"at {operation.events_expired_at.isoformat(timespec='seconds')} (event retention) "
        "and can no longer be streamed; its status, result and stop cause are still there "
        "(GetOperation)"
    )


@dataclass
class SweepTotals:
    """What one sweep deleted."""

    operations: int = 0
    events: int = 0
    steps: int = 0
    batches: int = 0


class RetentionSweeper:
    """Deletes expired events on a timer. `clock` is injectable so tests move time, not sleep."""

    def __init__(
        self,
        storage: Storage,
        retention_seconds: float,
        batch_size: int,
        interval_seconds: float,
        metrics: RetentionMetrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if retention_seconds < 0:
            raise ValueError("retention must not be negative")
        self.storage = storage
        self.retention = timedelta(seconds=retention_seconds)
        self.batch_size = batch_size
        self.interval_seconds = interval_seconds
        self.metrics = metrics
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Retention 0 keeps every event: nothing is ever swept."""
        return self.retention > timedelta(0)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    async def sweep(self, now: datetime | None = None) -> SweepTotals | None:
        """One sweep: every batch there is to do for operations that ended before `now` minus
        the retention. None when another replica holds the retention turn (or retention is 0)."""
        if not self.enabled:
            return None
        cutoff = (now or self.clock()) - self.retention
        totals = SweepTotals()
        async with self.storage.retention_turn() as mine:
            if not mine:
                self.metrics.sweeps.labels("skipped").inc()
                return None
            while True:
                batch = await self.storage.expire_events(cutoff, self.batch_size)
                if batch.empty:
                    break
                totals.batches += 1
                totals.operations += batch.operations
                totals.events += batch.events
                totals.steps += batch.steps
                self.metrics.operations.inc(batch.operations)
                self.metrics.events.inc(batch.events)
                self.metrics.steps.inc(batch.steps)
                await asyncio.sleep(0)  # the writes queued meanwhile go first
        self.metrics.sweeps.labels("done").inc()
        if totals.batches:
            log.info(
                "retention: expired the events of %d operations (%d events, %d step records)",
                totals.operations,
                totals.events,
                totals.steps,
            )
        return totals

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except STORAGE_FAILURES as exc:
                self.metrics.sweeps.labels("failed").inc()
                log.warning("retention sweep failed (%s); trying again later", exc)
            await asyncio.sleep(self.interval_seconds)
