"""Who runs what, the same on both dialects: the claim of work (pending, or abandoned by a replica
that died), the leases that keep it, and the count of what is claimable, as SQLAlchemy Core on the
database threads. Each dialect binds the ids of its claims and renewals its own way.

Claiming abandoned work is shared because it is rare (a replica died) and must work the same
everywhere: FOR UPDATE SKIP LOCKED lets PostgreSQL replicas claim concurrently without taking the
same row, and each take is still a compare-and-set, so even without row locks (SQLite, where
there is one replica) an operation is never claimed twice.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Update, and_, case, func, or_, select, update
from sqlalchemy.sql.elements import ColumnElement, TextClause

from runtime_service.domain import Event, EventKind, OperationStatus, StopCause
from runtime_service.metrics import UNFINISHED_STATUSES, UnfinishedCounts
from runtime_service.notifications import WORK, notify
from runtime_service.rows import operation_from_row
from runtime_service.schema import operations, steps
from runtime_service.storage.interface import ClaimBatch, Claimed
from runtime_service.storage.records import halt_data, halt_ms, utcnow
from runtime_service.storage.shared import SharedStorage
from runtime_service.storage.sql import Sql


def _pending_unheld(now: datetime) -> ColumnElement[bool]:
    """PENDING and not (or no longer) held: claimable."""
    return and_(
        operations.c.status == OperationStatus.PENDING,
        or_(operations.c.held_until.is_(None), operations.c.held_until <= now),
    )


def _running_lease_lapsed(now: datetime) -> ColumnElement[bool]:
    """RUNNING, but its owner stopped renewing the lease: the owner is presumed dead."""
    return and_(
        operations.c.status == OperationStatus.RUNNING,
        or_(operations.c.lease_expires_at.is_(None), operations.c.lease_expires_at <= now),
    )


class ClaimingStorage(SharedStorage):
    """SharedStorage plus claims and leases (see the module docstring); each dialect's class
    composes it with WaitingStorage."""

    async def claim_next(
        self,
        runner_id: str,
        limit: int,
        lease_seconds: float,
        running: Collection[str] = (),
    ) -> ClaimBatch:
        return await self._call(self._claim_next, runner_id, limit, lease_seconds, list(running))

    async def renew_leases(
        self, runner_id: str, operation_ids: list[str], lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        if not operation_ids:
            return set(), set()
        return await self._call(self._renew_leases, runner_id, operation_ids, lease_seconds)

    async def stored_intents(self, runner_id: str) -> set[str]:
        return await self._call(self._stored_intents, runner_id)

    async def drop_leases(self, runner_id: str) -> int:
        return await self._call(self._drop_leases, runner_id)

    async def expire_all_leases(self) -> int:
        return await self._call(self._expire_all_leases)

    async def count_unfinished(self) -> UnfinishedCounts:
        return await self._call(self._count_unfinished)

    # ----------------------------------------------------------------------------- on the threads

    def _count_unfinished(self) -> UnfinishedCounts:
        claimable = or_(_pending_unheld(utcnow()), _running_lease_lapsed(utcnow()))
        query = (
            select(
                operations.c.status,
                func.count(),
                func.coalesce(func.sum(case((claimable, 1), else_=0)), 0),
            )
            .where(operations.c.status.in_(UNFINISHED_STATUSES))
            .group_by(operations.c.status)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return UnfinishedCounts(
            by_status={str(row[0]): int(row[1]) for row in rows},
            claimable=sum(int(row[2]) for row in rows),
        )

    def _maybe_claimable(self, now: datetime, running: list[str]) -> bool:
        """Whether the claim's transaction is worth opening. Always, here: on PostgreSQL it
        locks only the rows it takes (SKIP LOCKED) and blocks no other write. SQLite's takes
        the file's one write lock and reads every running operation's lease under it."""
        return True

    def _not_among(self, ids: list[str]) -> tuple[ColumnElement[bool] | TextClause, ...]:
        """`operations.id` is none of `ids`, with the ids bound as one value (each dialect says
        how): an expanding NOT IN compiled one bound parameter per running operation on every
        claim, which at 10,000 running operations was most of the claim's time."""
        return (operations.c.id.not_in(ids),)

    def _claim_next(
        self, runner_id: str, limit: int, lease_seconds: float, running: list[str]
    ) -> ClaimBatch:
        now = utcnow()
        batch = ClaimBatch()
        if not self._maybe_claimable(now, running):
            return batch
        claimable = or_(_pending_unheld(now), _running_lease_lapsed(now))
        query = (
            select(
                operations.c.id,
                operations.c.status,
                operations.c.stop_requested_at,
                operations.c.pause_requested_at,
            )
            .where(claimable, *self._not_among(running))
            .order_by(operations.c.created_at, operations.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            for row in conn.execute(query).all():
                if row.status == OperationStatus.RUNNING and row.stop_requested_at is not None:
                    # Stopped while its owner was dead: end it, never resume it.
                    batch.finished.extend(self._halt_orphan(conn, row.id, now))
                    continue
                if row.status == OperationStatus.RUNNING and row.pause_requested_at is not None:
                    # Paused while its owner was dead: pause it, do not resume it.
                    batch.finished.extend(self._pause_orphan(conn, row.id, now))
                    continue
                claimed = self._take(
                    conn,
                    row.id,
                    runner_id,
                    now,
                    lease_seconds,
                    where=claimable,
                    resumed=row.status == OperationStatus.RUNNING,
                )
                if claimed is not None:
                    batch.claimed.append(claimed)
        return batch

    # The renewal of many leases in one statement, the ids bound as one value (a JSON array on
    # SQLite, an array on PostgreSQL): SQLAlchemy's expanding IN compiled 10,000 bound
    # parameters per renewal, most of a busy runtime's time. Each dialect defines its text.
    _RENEW_LEASES: Sql

    def _lease_ids(self, operation_ids: list[str]) -> Any:
        """The ids as the renewal statement binds them (see _RENEW_LEASES)."""
        return operation_ids

    def _renew_leases(
        self, runner_id: str, operation_ids: list[str], lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        params = {
            "ids": self._lease_ids(operation_ids),
            "runner": runner_id,
            "until": self.cursors.to_db(utcnow() + timedelta(seconds=lease_seconds)),
        }
        with self.cursors.transaction() as cur:
            cur.execute(self.cursors.sql(self._RENEW_LEASES), params)
            rows = cur.fetchall()
        # A pause is an intent the runner must act on like a stop (it reads which one it is).
        intent = {row[0] for row in rows if row[1] is not None or row[2] is not None}
        return {row[0] for row in rows}, intent

    def _stored_intents(self, runner_id: str) -> set[str]:
        query = select(operations.c.id).where(
            operations.c.status == OperationStatus.RUNNING,
            operations.c.runner_id == runner_id,
            or_(
                operations.c.stop_requested_at.is_not(None),
                operations.c.pause_requested_at.is_not(None),
            ),
        )
        with self.engine.connect() as conn:
            return {row[0] for row in conn.execute(query)}

    def _drop_leases(self, runner_id: str) -> int:
        with self.engine.begin() as conn:
            dropped = conn.execute(
                _expire_leases(
                    operations.c.runner_id == runner_id,
                    operations.c.status == OperationStatus.RUNNING,
                )
            ).rowcount
            if dropped:
                notify(conn, WORK)
            return dropped

    def _expire_all_leases(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                _expire_leases(operations.c.status == OperationStatus.RUNNING)
            ).rowcount

    def _take(
        self,
        conn: Connection,
        operation_id: str,
        runner_id: str,
        now: datetime,
        lease_seconds: float,
        where: ColumnElement[bool],
        resumed: bool,
    ) -> Claimed | None:
        steps_completed = conn.execute(
            select(operations.c.steps_completed).where(operations.c.id == operation_id)
        ).scalar_one_or_none()
        if steps_completed is None:
            return None
        event = self._append(
            conn,
            operation_id,
            EventKind.STARTED,
            {"from_step": steps_completed, "resumed": resumed},
            now,
            where=where,
            values={
                "status": OperationStatus.RUNNING,
                "runner_id": runner_id,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
                "held_until": None,
            },
        )
        if event is None:
            return None
        settled: list[Event] = []
        if resumed:
            self._settle_abandoned(conn, operation_id, now)
            mine = operations.c.runner_id == runner_id
            settled = self._settle_open_calls(conn, operation_id, now, mine)
        row = conn.execute(select(operations).where(operations.c.id == operation_id)).one()
        return Claimed(operation_from_row(row), event, tuple(settled))

    def _halt_orphan(self, conn: Connection, operation_id: str, now: datetime) -> list[Event]:
        """End an operation stopped while its owner was dead. If the owner died in the middle
        of a step (its attempt never finished), that step was cut: the halt says so."""
        step, requested_at, cause = conn.execute(
            select(
                operations.c.steps_completed,
                operations.c.stop_requested_at,
                operations.c.stop_cause,
            ).where(operations.c.id == operation_id)
        ).one()
        cut = conn.execute(
            select(steps.c.attempt).where(
                steps.c.operation_id == operation_id,
                steps.c.step == step,
                steps.c.finished_at.is_(None),
            )
        ).first()
        settled = self._settle_open_calls(conn, operation_id, now, _running_lease_lapsed(now))
        event = self._append(
            conn,
            operation_id,
            EventKind.INTERRUPTED,
            halt_data(
                cut is not None,
                step,
                halt_ms(now, requested_at, None),
                StopCause(cause) if cause else None,
            ),
            now,
            where=_running_lease_lapsed(now),
            values={"status": OperationStatus.INTERRUPTED, "finished_at": now},
        )
        if event is not None:
            self._settle_abandoned(conn, operation_id, now)
        return [*settled, event] if event is not None else []


def _expire_leases(*where: ColumnElement[bool]) -> Update:
    """Expire the leases of the running operations `where` selects, locking their rows in id
    order first, as PostgreSQL's write batches and lease renewal lock theirs: in the order it
    scanned them, a runtime handing its leases back at shutdown deadlocked with a batch of
    writes its cancelled runs had left in flight (SQLite takes no row locks; the order does
    nothing there)."""
    ordered = select(operations.c.id).where(*where).order_by(operations.c.id).with_for_update()
    return (
        update(operations)
        .where(operations.c.id.in_(ordered.scalar_subquery()), *where)
        .values(lease_expires_at=utcnow())
    )
