"""Every table of the runtime, as SQLAlchemy Core, in one place.

Alembic migrations (runtime_service/migrations) create exactly this schema; a test compares them.
Timestamps are stored as UTC; UTCDateTime hands back timezone-aware values on every backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime, also on SQLite (which keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def sqlite_utc_text(value: datetime) -> str:
    """What UTCDateTime stores on SQLite (SQLAlchemy's DATETIME text of the naive UTC time),
    made without SQLAlchemy's two layers of bind processors: the runner's writes convert a
    time or two per statement, and this is a third of the cost. tests/test_write_path.py
    holds it to SQLAlchemy's own conversion."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTCDateTime column")
    v = value.astimezone(UTC)
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 (the fastest of the three)
        v.year,
        v.month,
        v.day,
        v.hour,
        v.minute,
        v.second,
        v.microsecond,
    )


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

operations = Table(
    "operations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("agent", String(200), nullable=False),
    Column("input_json", Text, nullable=False),
    # sha256 of (agent, input): tells a repeated idempotent start from a conflicting one.
    Column("request_hash", String(64), nullable=False),
    # Unique per owner (see the constraint below): two principals never share an operation
    # through a key, and no owner can learn that another used a given key.
    Column("idempotency_key", String(200), nullable=True),
    # The principal the operation belongs to ('' = none, e.g. started on the runtime directly);
    # the gateway only ever shows a caller its own operations.
    Column("owner", String(200), nullable=False, server_default=""),
    # Caller metadata (JSON object of strings), e.g. the gateway's cancel policy.
    Column("labels_json", Text, nullable=True),
    Column("status", String(16), nullable=False),
    # Step state: written only by the runner that owns the operation.
    Column("steps_completed", Integer, nullable=False, default=0),
    Column("agent_state_json", Text, nullable=True),
    Column("result_json", Text, nullable=True),
    Column("error", Text, nullable=True),
    # Ownership: the runner that runs the operation, until its lease expires. Every write of a
    # runner is conditional on still being the owner (fencing), so a runner that lost its lease
    # (paused, partitioned) cannot write over the replica that took the operation over.
    Column("runner_id", String(100), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    # A held operation (see StartOperationRequest.hold) is not claimable before this time.
    Column("held_until", UTCDateTime, nullable=True),
    # Highest event seq; bumped in the same UPDATE that performs each state change, which both
    # allocates the next seq gap-free and serialises writers of one operation on its row.
    Column("last_seq", BigInteger, nullable=False, default=0),
    # Stop intent: written only by InterruptOperation, never by a step write.
    Column("stop_requested_at", UTCDateTime, nullable=True),
    Column("stop_requested_by", String(200), nullable=True),
    Column("stop_reason", Text, nullable=True),
    # Limits set at start (see StartOperationRequest): the runner that owns the operation stops
    # it at `deadline_at` (re-armed from this column by whoever takes it over), and at the
    # boundary after `max_steps` steps. NULL: no limit.
    Column("deadline_at", UTCDateTime, nullable=True),
    Column("max_steps", Integer, nullable=True),
    # The W3C traceparent of the start request's span: each run of the operation (on whichever
    # replica, however long after the start) is a child of it. NULL when tracing was off.
    Column("trace_parent", String(55), nullable=True),
    # A StopCause value; NULL for stops recorded before causes existed.
    Column("stop_cause", String(32), nullable=True),
    # The newest input request a step made (see input_requests); NULL: none yet.
    Column("input_request_id", String(64), nullable=True),
    # A pause requested while a step ran, until its runner cuts the step (status PAUSED) or a
    # stop wins. Like the stop intent, written by the pause alone, never by a step write.
    Column("pause_requested_at", UTCDateTime, nullable=True),
    Column("pause_requested_by", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    # When retention (runtime_service/retention.py) expired the operation's events and step
    # records: set before the first of them is deleted, so a watch tells "expired" from "never
    # existed". The row itself (status, result, cause) stays. NULL: its events are kept.
    Column("events_expired_at", UTCDateTime, nullable=True),
    Index(None, "created_at", "id"),
    # Retention's candidates: not yet expired, oldest finished first (IS NULL is an index
    # condition on both backends, so expired rows are never scanned again).
    Index(None, "events_expired_at", "finished_at"),
    Index(None, "status", "created_at", "id"),
    # The sweep for WAITING / PAUSED operations past their deadline reads only those due.
    Index(None, "status", "deadline_at"),
    Index(None, "owner", "created_at", "id"),
    UniqueConstraint("owner", "idempotency_key"),
)

events = Table(
    "events",
    metadata,
    Column("operation_id", String(36), ForeignKey("operations.id"), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("data_json", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# One row per attempt at a step: when and by which runner it ran and how it ended. The
# checkpoint itself (agent state) lives on the operation row; these rows are the audit trail.
steps = Table(
    "steps",
    metadata,
    Column("operation_id", String(36), ForeignKey("operations.id"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("runner_id", String(100), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    # completed | failed | interrupted | abandoned (its runner died or lost the operation
    # mid-step; set by whoever took the operation over or halted it); NULL while running.
    Column("outcome", String(16), nullable=True),
    Column("output_json", Text, nullable=True),
)

# A stop sent by idempotency key before any operation had that key (for that owner): the start
# that comes with the key before `expires_at` creates its operation already INTERRUPTED and
# consumes the row. Expired rows have no effect and are removed when the next stop by key is
# written. The primary key is what makes two stops by the same key one tombstone.
stop_tombstones = Table(
    "stop_tombstones",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("idempotency_key", String(200), primary_key=True),
    Column("requested_by", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("cause", String(32), nullable=False),
    Column("requested_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Index(None, "expires_at"),
)

# Operations retention has expired whose events or step records are not all deleted yet: the
# deletion runs in small batches, and a row here survives a crash between them (removed when
# the operation has nothing left).
event_purges = Table(
    "event_purges",
    metadata,
    Column("operation_id", String(36), ForeignKey("operations.id"), primary_key=True),
    Column("queued_at", UTCDateTime, nullable=False),
)


# A question a step asked a person (see runtime_service/waiting.py): an approval of a tool call or
# a free answer. `outcome` is 'open' until the first answer wins ('answered', a compare-and-set
# on this column) or the request expires ('expired', resolved with `default_json`). The
# (outcome, expires_at) index is what the expiry sweep reads: only open requests, soonest first.
input_requests = Table(
    "input_requests",
    metadata,
    Column("operation_id", String(36), ForeignKey("operations.id"), primary_key=True),
    Column("request_id", String(64), primary_key=True),
    Column("step", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("prompt", Text, nullable=False),
    # The request as the input_requested event shows it (call, arguments, schema, default).
    Column("request_json", Text, nullable=False),
    Column("schema_json", Text, nullable=True),
    Column("default_json", Text, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("answer_id", String(200), nullable=True),
    Column("answer_json", Text, nullable=True),
    Column("answered_by", String(200), nullable=True),
    Column("resolved_at", UTCDateTime, nullable=True),
    Index(None, "outcome", "expires_at"),
)
