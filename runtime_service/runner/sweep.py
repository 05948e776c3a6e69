"""The sweep loop: every replica resolves the input requests past their expiry and stops the
waiting operations past their deadline, every poll_seconds. It is a loop of its own, apart from
the lease loop, so that a slow sweep never delays a lease renewal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from runtime_service.runner.limits import Limits
from runtime_service.runner.writes import Writes
from runtime_service.storage import STORAGE_FAILURES, Storage

log = logging.getLogger(__package__)


class Sweep:
    def __init__(
        self,
        storage: Storage,
        writes: Writes,
        limits: Limits,
        wake: Callable[[], None],
        poll_seconds: float,
    ) -> None:
        self._storage = storage
        self._writes = writes
        self._limits = limits
        self._wake = wake
        self._poll_seconds = poll_seconds

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            await self.expire_requests()

    async def expire_requests(self) -> None:
        """Resolve input requests past their expiry (every replica sweeps; each resolution is a
        compare-and-set), and look for the work they made claimable; stop waiting operations
        past their deadline."""
        try:
            expired = await self._storage.expire_requests()
            await self._limits.stop_overdue_waiting()
        except STORAGE_FAILURES as exc:
            log.warning("expiring input requests failed (%s); retrying", exc)
            return
        if expired:
            self._writes.publish(expired)
            self._wake()
