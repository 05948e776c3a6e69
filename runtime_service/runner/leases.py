"""Ownership: a runner runs an operation under a lease it renews; every write it makes is
conditional on still owning it. Work is claimed by the claim loop (woken by notifications, a
finished run, or its poll timer), never more than `max_running` at once. The lease loop renews
the leases, cancels the step of an operation whose lease was lost, and looks at the stored stop
and pause intents: the fallback for a notification this runner missed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from runtime_service import metrics
from runtime_service.runner.runs import Run, RunnerSettings
from runtime_service.runner.writes import Writes
from runtime_service.storage import STORAGE_FAILURES, ClaimBatch, Claimed, Storage

log = logging.getLogger(__package__)


class Leases:
    def __init__(
        self,
        storage: Storage,
        settings: RunnerSettings,
        runs: dict[str, Run],
        writes: Writes,
        meters: metrics.RuntimeMetrics,
        launch: Callable[[str, Claimed], None],
        deliver_stop: Callable[[str], bool],
        deliver_pause: Callable[[str], bool],
    ) -> None:
        self._storage = storage
        self.settings = settings
        self._runs = runs
        self._writes = writes
        self._metrics = meters
        self._launch = launch
        self._deliver_stop = deliver_stop
        self._deliver_pause = deliver_pause
        self._wake_claimer = asyncio.Event()
        self._wake_leases = asyncio.Event()

    def wake(self) -> None:
        """Look for claimable work now."""
        self._wake_claimer.set()

    def check_stops_now(self) -> None:
        """Renew and re-read the stored stop intents now."""
        self._wake_leases.set()

    async def claim_loop(self) -> None:
        while True:
            free = self.settings.max_running - len(self._runs)
            if free > 0:
                try:
                    batch = await self._storage.claim_next(
                        self.settings.runner_id, free, self.settings.lease_seconds, list(self._runs)
                    )
                except STORAGE_FAILURES as exc:
                    log.warning("claiming work failed (%s); retrying", exc)
                else:
                    self._writes.publish(batch.finished)
                    self._count_takeovers(batch)
                    for claimed in batch.claimed:
                        self._launch(claimed.operation.id, claimed)
                    if len(batch.claimed) == free:
                        continue  # there may be more
            self._wake_claimer.clear()
            try:
                async with asyncio.timeout(self.settings.poll_seconds):
                    await self._wake_claimer.wait()
            except TimeoutError:
                pass

    def _count_takeovers(self, batch: ClaimBatch) -> None:
        takeover = self._metrics.takeover
        for event in batch.finished:
            if event.is_terminal:
                takeover["halted"].inc()
        for claimed in batch.claimed:
            data = claimed.event.data
            if isinstance(data, dict) and data.get("resumed") is True:
                takeover["resumed"].inc()

    async def lease_loop(self) -> None:
        """Renew every lease a third of the way through it, and look for stored intents every
        poll: a renewal writes and returns a row per running operation (at 10,000 running, a
        renewal a second was a tenth of the runtime's CPU), a look returns only the operations
        with a stop or a pause recorded. A wake (check_stops_now) renews at once."""
        loop = asyncio.get_running_loop()
        renew_every = self.settings.lease_seconds / 3
        look_every = min(self.settings.poll_seconds, renew_every)
        next_renewal = loop.time() + renew_every
        while True:
            self._wake_leases.clear()
            try:
                async with asyncio.timeout(look_every):
                    await self._wake_leases.wait()
            except TimeoutError:
                pass
            if self._wake_leases.is_set() or loop.time() >= next_renewal:
                # A failed renewal is due again at the next poll, well within the lease.
                renewed = await self._renew()
                next_renewal = loop.time() + (renew_every if renewed else 0.0)
            else:
                await self._look()

    async def _look(self) -> None:
        try:
            stopping = await self._storage.stored_intents(self.settings.runner_id)
        except STORAGE_FAILURES as exc:
            log.warning("reading stored stop intents failed (%s); retrying", exc)
            return
        await self._deliver_stored(stopping)

    async def _renew(self) -> bool:
        """Renew the leases; False when storage failed (nothing renewed)."""
        owned = {op_id: run for op_id, run in self._runs.items() if run.owned}
        try:
            kept, stopping = await self._storage.renew_leases(
                self.settings.runner_id, list(owned), self.settings.lease_seconds
            )
        except STORAGE_FAILURES as exc:
            log.warning("renewing leases failed (%s); retrying", exc)
            return False
        await self._deliver_stored(stopping)
        for operation_id in set(owned) - kept:
            # Finished meanwhile, or taken over after our lease lapsed. Our own writes are
            # fenced and will be refused; cancel the step in flight so the agent's work
            # never runs on two replicas at once.
            run = owned[operation_id]
            if self._runs.get(operation_id) is not run:
                continue  # ended meanwhile
            if run.step_task is not None and not run.step_task.done():
                log.warning("operation %s: lease lost; abandoning its step", operation_id)
                run.step_task.cancel()
        return True

    async def _deliver_stored(self, operation_ids: set[str]) -> None:
        """Deliver the stored intents (stop or pause) of operations this runner runs: the
        fallback for a missed notification."""
        for operation_id in operation_ids:
            run = self._runs.get(operation_id)
            if run is None or run.stop.done():
                continue
            try:
                operation = await self._storage.get(operation_id)
            except STORAGE_FAILURES as exc:
                log.warning("reading a stored stop intent failed (%s); retrying", exc)
                continue
            if operation is None or operation.stop is not None:
                self._deliver_stop(operation_id)
            elif operation.pause_requested_at is not None:
                self._deliver_pause(operation_id)
