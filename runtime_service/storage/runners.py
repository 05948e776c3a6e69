"""The runner directory: where each live runner can be reached (see schema.runners).

A replica that records a stop for an operation another runner runs sends it straight to that
runner's address too (runtime_service/direct_stops.py); the stops notification stays the
fallback, so these rows are a hint, never the truth: a missing one costs the direct path, a
stale one a failed call. Rare writes (once a minute per replica), so SQLAlchemy Core, once for
both dialects.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, insert, or_, select

from runtime_service.schema import runners
from runtime_service.storage.interface import utcnow
from runtime_service.storage.shared import SharedStorage

# A live runner re-registers every REGISTER_SECONDS (Runner's sweep loop); a row not seen for
# FORGET_SECONDS is a runner that died without unregistering.
REGISTER_SECONDS = 60.0
FORGET_SECONDS = 600.0


class RunnerDirectory(SharedStorage):
    async def register_runner(self, runner_id: str, address: str) -> None:
        await self._call(self._register_runner, runner_id, address)

    async def unregister_runner(self, runner_id: str) -> None:
        await self._call(self._unregister_runner, runner_id)

    async def runner_addresses(self) -> dict[str, str]:
        return await self._call(self._runner_addresses)

    def _register_runner(self, runner_id: str, address: str) -> None:
        now = utcnow()
        forgotten = now - timedelta(seconds=FORGET_SECONDS)
        with self.engine.begin() as conn:
            conn.execute(
                delete(runners).where(
                    or_(runners.c.runner_id == runner_id, runners.c.seen_at < forgotten)
                )
            )
            conn.execute(insert(runners).values(runner_id=runner_id, address=address, seen_at=now))

    def _unregister_runner(self, runner_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(runners).where(runners.c.runner_id == runner_id))

    def _runner_addresses(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runners.c.runner_id, runners.c.address)).all()
        return {row.runner_id: row.address for row in rows}
