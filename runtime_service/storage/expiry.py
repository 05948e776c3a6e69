"""Retention's deletions, the same on both dialects (SQLAlchemy Core: they run once a batch, not
once a step, so compiling them costs nothing that matters).

One batch is one short transaction touching at most `batch_size` rows, so it never holds up the
writes of running operations for long: on SQLite the writes queue behind it on the database
thread for a few milliseconds; on PostgreSQL it locks none of their rows (an operation it touches
has ended, and nothing writes to an ended operation).

An operation's expiry is recorded before any of its rows goes: the batch that picks it sets
`events_expired_at` and queues it in `event_purges`, in the transaction that deletes its first
rows. A watch therefore sees the marker whenever it could miss an event, and a crash between
batches leaves the queue row, so the next batch (on whichever replica) finishes the deletion.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, Engine, delete, insert, select, tuple_, update

from runtime_service.domain import TERMINAL_STATUSES
from runtime_service.schema import event_purges, events, operations, steps
from runtime_service.storage.interface import ExpiredBatch

# Operations newly expired per batch, as a share of the batch size: finished operations hold a
# few dozen events each, so a batch of 500 rows usually empties about this many.
OPERATIONS_PER_ROWS = 16


def expire_batch(engine: Engine, cutoff: datetime, batch_size: int, now: datetime) -> ExpiredBatch:
    """See Storage.expire_events."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    with engine.begin() as conn:
        queued = list(
            conn.execute(
                select(event_purges.c.operation_id)
                .order_by(event_purges.c.queued_at, event_purges.c.operation_id)
                .limit(batch_size)
            ).scalars()
        )
        expired = 0
        if not queued:
            queued = _expire_next(conn, cutoff, max(1, batch_size // OPERATIONS_PER_ROWS), now)
            expired = len(queued)
        budget = batch_size
        events_deleted = steps_deleted = 0
        for operation_id in queued:
            if budget <= 0:
                break
            deleted = _delete_events(conn, operation_id, budget)
            events_deleted += deleted
            budget -= deleted
            if budget > 0:
                deleted = _delete_steps(conn, operation_id, budget)
                steps_deleted += deleted
                budget -= deleted
            if budget > 0:  # both deletes took less than they could: nothing of it is left
                conn.execute(
                    delete(event_purges).where(event_purges.c.operation_id == operation_id)
                )
                budget -= 1  # a statement like any other row's
    return ExpiredBatch(expired, events_deleted, steps_deleted)


def _expire_next(conn: Connection, cutoff: datetime, limit: int, now: datetime) -> list[str]:
    """Mark the oldest operations that ended before `cutoff` as expired and queue them. Only
    ended ones qualify (a terminal status and a finish time): nothing writes to those any more,
    so marking them races with no runner."""
    oldest = (
        select(operations.c.id)
        .where(
            operations.c.events_expired_at.is_(None),
            operations.c.finished_at < cutoff,
            operations.c.status.in_([status.value for status in TERMINAL_STATUSES]),
        )
        .order_by(operations.c.finished_at)
        .limit(limit)
    )
    marked = list(
        conn.execute(
            update(operations)
            .where(operations.c.id.in_(oldest), operations.c.events_expired_at.is_(None))
            .values(events_expired_at=now)
            .returning(operations.c.id)
        ).scalars()
    )
    if marked:
        conn.execute(
            insert(event_purges), [{"operation_id": id_, "queued_at": now} for id_ in marked]
        )
    return marked


def _delete_events(conn: Connection, operation_id: str, limit: int) -> int:
    """The operation's oldest `limit` events."""
    first = (
        select(events.c.seq)
        .where(events.c.operation_id == operation_id)
        .order_by(events.c.seq)
        .limit(limit)
    )
    result = conn.execute(
        delete(events).where(events.c.operation_id == operation_id, events.c.seq.in_(first))
    )
    return int(result.rowcount)


def _delete_steps(conn: Connection, operation_id: str, limit: int) -> int:
    """The operation's first `limit` step records (attempts)."""
    first = (
        select(steps.c.step, steps.c.attempt)
        .where(steps.c.operation_id == operation_id)
        .order_by(steps.c.step, steps.c.attempt)
        .limit(limit)
    )
    result = conn.execute(
        delete(steps).where(
            steps.c.operation_id == operation_id,
            tuple_(steps.c.step, steps.c.attempt).in_(first),
        )
    )
    return int(result.rowcount)
