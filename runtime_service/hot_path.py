"""The latency- and throughput-critical statements, as fixed SQL run on the driver's own cursor:
the runner's writes (a step begins, a chunk is emitted, a step boundary is crossed, a run is
halted), the recording of a stop, and the reads watchers repeat (an operation, a page of events).

Why not SQLAlchemy Core like the rest of the store: these run several times per step, and
building, cache-keying and compiling Core statements, plus the Connection layer around them, cost
several times the database work itself (`python -m bench.write_path` measures it). The SQL here
is fixed, so it is written once per dialect; the drivers then keep their own prepared statements
(sqlite3's statement cache, psycopg's automatic server-side prepare). The invariants are the
store's (see store.py): every write is a compare-and-set on the operation row that bumps
`last_seq`, and the events it reports are inserted with those seqs in the same transaction.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from runtime_service.domain import Event, EventKind, JSONValue, Operation, OperationStatus
from runtime_service.notifications import EVENTS, STOPS, WORK
from runtime_service.rows import operation_from_row
from runtime_service.schema import UTCDateTime, operations

STEP_COMPLETED = EventKind.STEP_COMPLETED


T = TypeVar("T")
U = TypeVar("U")


# What a runner write's `x_in(cursor, ...)` returns: its statements are sent, and calling this reads
# their outcome.
Sent = Callable[[], T]


@dataclass(frozen=True, slots=True)
class Statement(Generic[T]):
    """A write that is one PostgreSQL statement, as data, so that a batcher can send many at
    once and read each outcome from its returned row (see pg_batch)."""

    sql: str
    params: dict[str, Any]
    read: Callable[[Any], T]  # the statement's one returned row, or None -> the outcome

    def then(self, convert: Callable[[Any], U]) -> Statement[U | None]:
        """The same statement, its outcome passed through `convert` unless it is None."""
        read = self.read

        def converted(row: Any) -> U | None:
            outcome = read(row)
            return None if outcome is None else convert(outcome)

        return Statement(self.sql, self.params, converted)


# One write of a group commit: its `x_in` and its arguments after the cursor.
Together = tuple[Callable[..., Callable[[], Any]], tuple[Any, ...]]


def _ready(value: T) -> Sent[T]:
    return lambda: value


class WouldBlock(Exception):
    """The write cannot run right here without waiting (see HotPath.inline)."""


def _dump(value: JSONValue) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def halt_ms(
    halted_at: datetime, stop_recorded_at: datetime | None, seen_at: datetime | None
) -> float:
    """Milliseconds from the committed stop to the halt, for the `interrupted` event.

    The stored stop time is taken just before the stop's write, so it comes early by however
    long that write waited and took to commit (under load, hundreds of milliseconds). `seen_at`,
    when known, is a time after the commit: taken by the replica that recorded the stop right
    after its commit, or by the runner when the stop's notification arrived. The later of the
    two is the closer to the commit. (_PG_FINISH_INTERRUPTED computes the same in SQL.)"""
    since = max((t for t in (stop_recorded_at, seen_at) if t is not None), default=None)
    if since is None:
        return 0.0
    return round(max(0.0, (halted_at - since).total_seconds() * 1000.0), 3)


# Owned by this runner and still running: the fencing condition of every runner write.
_OWNED = "id = :id AND status = 'RUNNING' AND runner_id = :runner"

_COUNT_ATTEMPTS = "SELECT count(*) FROM steps WHERE operation_id = :id AND step = :step"

_BUMP_TO_START = f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
WHERE {_OWNED} AND stop_requested_at IS NULL
RETURNING last_seq"""

# Output is stored only while no stop is recorded, so once a stop_requested event is stored no
# output follows it, only the halt. `:outlives_stop` lifts that for the stop-at-boundary mode,
# where the step in flight runs to its end and its output is kept.
_BUMP_FOR_CHUNK = f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
WHERE {_OWNED} AND (stop_requested_at IS NULL OR :outlives_stop)
RETURNING last_seq"""

# Checkpoint step N and, unless a stop is recorded, begin step N+1: one seq for step_completed,
# a second for step_started only when no stop is recorded (the stop wins at the boundary).
_BUMP_TO_ADVANCE = f"""
UPDATE operations SET
  last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
  steps_completed = :next_step, agent_state_json = :state, updated_at = :now
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at"""

_INSERT_EVENT = """
INSERT INTO events (operation_id, seq, kind, data_json, created_at)
VALUES (:id, :seq, :kind, :data, :now)"""

_INSERT_TWO_EVENTS = """
INSERT INTO events (operation_id, seq, kind, data_json, created_at)
VALUES (:id, :seq, :kind, :data, :now), (:id, :seq2, :kind2, :data2, :now)"""

_INSERT_ATTEMPT = """
INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
VALUES (:id, :step, :attempt, :runner, :now)"""

# Only the newest attempt is this runner's (older ones were settled as abandoned at takeover).
_FINISH_ATTEMPT = """
UPDATE steps SET finished_at = :now, outcome = 'completed', output_json = :output
WHERE operation_id = :id AND step = :step AND finished_at IS NULL
  AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)"""

_NOTIFY = "SELECT pg_notify(:channel, :payload)"

# Every column, by name (cursor.description), so the row maps whatever the schema holds.
_GET = "SELECT * FROM operations WHERE id = :id"
_EVENTS_AFTER = """
SELECT seq, kind, data_json, created_at FROM events
WHERE operation_id = :id AND seq > :after ORDER BY seq LIMIT :limit"""
_TIME_COLUMNS = (
    "created_at",
    "updated_at",
    "finished_at",
    "stop_requested_at",
    "lease_expires_at",
    "held_until",
)

# The stop intent, recorded once, on an operation that has not ended. Step writes never touch
# these columns, and this touches nothing else (beyond the seq), so neither overwrites the other.
_RECORD_STOP = """
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason
WHERE id = :id AND status IN ('PENDING', 'RUNNING') AND stop_requested_at IS NULL
RETURNING last_seq, status"""

# A PENDING operation is interrupted right where its stop is recorded: no runner ever starts it.
_INTERRUPT_PENDING = """
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  status = 'INTERRUPTED', finished_at = :now
WHERE id = :id AND status = 'PENDING'
RETURNING last_seq"""

_INTERRUPT_OWNED = f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  status = 'INTERRUPTED', finished_at = :now
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at"""

# Starting an operation (StartOperation, ReleaseOperation, the runner's claim after a local start).
_BY_KEY = "SELECT * FROM operations WHERE owner = :owner AND idempotency_key = :key"

_CREATE = """
INSERT INTO operations (id, agent, input_json, request_hash, idempotency_key, owner, labels_json,
  status, steps_completed, last_seq, held_until, created_at, updated_at)
VALUES (:id, :agent, :input, :hash, :key, :owner, :labels,
  'PENDING', 0, 1, :held_until, :now, :now)"""

_RELEASE = """
UPDATE operations SET held_until = NULL
WHERE id = :id AND status = 'PENDING' AND held_until IS NOT NULL
RETURNING id"""

_CLAIM = """
UPDATE operations SET status = 'RUNNING', runner_id = :runner, lease_expires_at = :lease,
  held_until = NULL, last_seq = last_seq + 1, updated_at = :now
WHERE id = :id AND status = 'PENDING' AND (held_until IS NULL OR held_until <= :now)
RETURNING last_seq, steps_completed"""

_FINISH_ATTEMPT_INTERRUPTED = """
UPDATE steps SET finished_at = :now, outcome = 'interrupted'
WHERE operation_id = :id AND step = :step AND finished_at IS NULL
  AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)"""

# In a PostgreSQL statement whose `op` CTE checkpointed step :step: mark the attempt completed.
_PG_FINISH_ATTEMPT = """finished AS (
  UPDATE steps SET finished_at = :now, outcome = 'completed', output_json = :output
  WHERE operation_id = :id AND step = :step AND finished_at IS NULL
    AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)
    AND EXISTS (SELECT 1 FROM op)
)"""

# PostgreSQL: the same writes as one statement each (data-modifying CTEs all run, against one
# snapshot, in the statement's own transaction), so a step boundary costs one round trip and one
# commit instead of eight round trips.
_PG_ADVANCE = f"""
WITH op AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
    steps_completed = :next_step, agent_state_json = :state, updated_at = :now
  WHERE {_OWNED}
  RETURNING last_seq, stop_requested_at IS NULL AS go
), {_PG_FINISH_ATTEMPT}, began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, :next_step, 1, :runner, :now FROM op WHERE go
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN go THEN 1 ELSE 0 END, 'step_completed', :data, :now FROM op
  UNION ALL
  SELECT :id, last_seq, 'step_started', :data2, :now FROM op WHERE go
)
SELECT last_seq, CASE WHEN go THEN NULL ELSE 1 END, pg_notify('{EVENTS}', :id || ':' || last_seq)
FROM op"""

# PostgreSQL: checkpoint the last step and complete the operation, unless a stop was recorded
# first (then only the checkpoint: the stop wins, and the runner halts at this boundary).
_PG_COMPLETE = f"""
WITH op AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
    steps_completed = :next_step, agent_state_json = :state, updated_at = :now,
    status = CASE WHEN stop_requested_at IS NULL THEN 'COMPLETED' ELSE status END,
    result_json = CASE WHEN stop_requested_at IS NULL THEN :output ELSE result_json END,
    finished_at = CASE WHEN stop_requested_at IS NULL THEN :now ELSE finished_at END
  WHERE {_OWNED}
  RETURNING last_seq, stop_requested_at IS NULL AS go
), {_PG_FINISH_ATTEMPT}, written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN go THEN 1 ELSE 0 END, 'step_completed', :data, :now FROM op
  UNION ALL
  SELECT :id, last_seq, 'completed', :data2, :now FROM op WHERE go
)
SELECT last_seq, CASE WHEN go THEN NULL ELSE 1 END, pg_notify('{EVENTS}', :id || ':' || last_seq)
FROM op"""

_PG_CHUNK = f"""
WITH op AS ({_BUMP_FOR_CHUNK}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'output_chunk', :data, :now FROM op
)
SELECT last_seq, pg_notify('{EVENTS}', :id || ':' || last_seq) FROM op"""


# Every column of an operation, in a fixed order, for statements that return a whole row.
_COLUMNS = tuple(column.name for column in operations.c)
_COLUMN_LIST = ", ".join(_COLUMNS)

# PostgreSQL: a locally started operation is claimed and its first step begun in one statement
# (its claim and step_started events, its attempt row); a PENDING operation never has a stop
# recorded (recording one interrupts it), so the step always begins.
_PG_CLAIM_AND_START = f"""
WITH claimed AS (
  UPDATE operations SET status = 'RUNNING', runner_id = :runner, lease_expires_at = :lease,
    held_until = NULL, last_seq = last_seq + 2, updated_at = :now
  WHERE id = :id AND status = 'PENDING' AND (held_until IS NULL OR held_until <= :now)
  RETURNING {_COLUMN_LIST}
), attempt AS (
  SELECT count(*) + 1 AS n FROM steps
  WHERE operation_id = :id AND step = (SELECT steps_completed FROM claimed)
), began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, steps_completed, attempt.n, :runner, :now FROM claimed, attempt
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - 1, 'started',
    -- (',"resumed":' and 'false}}' apart: a colon before a word would read as a parameter)
    '{{"from_step":' || steps_completed || ',"resumed":' || 'false}}', :now FROM claimed
  UNION ALL
  SELECT :id, last_seq, 'step_started',
    '{{"step":' || steps_completed || ',"attempt":' || attempt.n || '}}', :now
  FROM claimed, attempt
)
SELECT {_COLUMN_LIST}, attempt.n, pg_notify('{EVENTS}', :id || ':' || last_seq)
FROM claimed, attempt"""

# PostgreSQL: a new operation and its `created` event in one statement; no row when the owner's
# idempotency key is taken (the caller then looks for the twin the slow way).
_PG_CREATE = f"""
WITH created AS (
  INSERT INTO operations (id, agent, input_json, request_hash, idempotency_key, owner,
    labels_json, status, steps_completed, last_seq, held_until, created_at, updated_at)
  VALUES (:id, :agent, :input, :hash, :key, :owner, :labels,
    'PENDING', 0, 1, :held_until, :now, :now)
  ON CONFLICT (owner, idempotency_key) DO NOTHING
  RETURNING {_COLUMN_LIST}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT id, 1, 'created', :data, :now FROM created
)
SELECT {_COLUMN_LIST}, CASE WHEN :announce AND held_until IS NULL THEN pg_notify('{WORK}', '') END
FROM created"""

_PG_RELEASE = f"""
WITH released AS (
  UPDATE operations SET held_until = NULL
  WHERE id = :id AND status = 'PENDING' AND held_until IS NOT NULL
  RETURNING {_COLUMN_LIST}
)
SELECT {_COLUMN_LIST}, CASE WHEN :announce THEN pg_notify('{WORK}', '') END FROM released"""

# PostgreSQL: start_step as one statement.
_PG_START_STEP = f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
  WHERE {_OWNED} AND stop_requested_at IS NULL
  RETURNING last_seq
), attempt AS (
  SELECT count(*) + 1 AS n FROM steps WHERE operation_id = :id AND step = :step
), began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, :step, attempt.n, :runner, :now FROM op, attempt
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'step_started',
    '{{"step":' || :step || ',"attempt":' || attempt.n || '}}', :now
  FROM op, attempt
)
SELECT last_seq, attempt.n, pg_notify('{EVENTS}', :id || ':' || last_seq) FROM op, attempt"""


# PostgreSQL: record_stop_in as one statement. A PENDING operation is interrupted in the same
# UPDATE (SET sees the old row, so `status` there is the status before the stop).
_PG_RECORD_STOP = f"""
WITH stopped AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN status = 'PENDING' THEN 2 ELSE 1 END,
    updated_at = :now, stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason,
    status = CASE WHEN status = 'PENDING' THEN 'INTERRUPTED' ELSE status END,
    finished_at = CASE WHEN status = 'PENDING' THEN :now ELSE finished_at END
  WHERE id = :id AND status IN ('PENDING', 'RUNNING') AND stop_requested_at IS NULL
  RETURNING {_COLUMN_LIST}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN status = 'INTERRUPTED' THEN 1 ELSE 0 END, 'stop_requested',
    :data, :now FROM stopped
  UNION ALL
  SELECT :id, last_seq, 'interrupted', :halted, :now FROM stopped WHERE status = 'INTERRUPTED'
)
SELECT {_COLUMN_LIST}, pg_notify('{EVENTS}', :id || ':' || last_seq),
  CASE WHEN status = 'RUNNING' THEN pg_notify('{STOPS}', :id) END
FROM stopped"""

# PostgreSQL: finish_interrupted_in as one statement. The event's data is built here, where the
# stored stop time is (halt_ms as halt_ms() computes it: from the later of the stored stop time
# and :seen; whole microseconds, so three decimals are exact), and returned.
_PG_FINISH_INTERRUPTED = f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
    status = 'INTERRUPTED', finished_at = :now
  WHERE {_OWNED}
  RETURNING last_seq,
    '{{"mid_step":' || CASE WHEN :mid_step THEN 'true' ELSE 'false' END || ',"step":' || :step
    || ',"halt_ms":' || coalesce(round(
      greatest(0, extract(epoch FROM :now - greatest(stop_requested_at, :seen)) * 1000), 3), 0)
    || '}}' AS data
), attempt AS (
  UPDATE steps SET finished_at = :now, outcome = 'interrupted'
  WHERE :mid_step AND operation_id = :id AND step = :step AND finished_at IS NULL
    AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)
    AND EXISTS (SELECT 1 FROM op)
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'interrupted', data, :now FROM op
)
SELECT last_seq, data, pg_notify('{EVENTS}', :id || ':' || last_seq) FROM op"""


class HotPath:
    """Each runner write comes twice: `x_in(cursor, ...)` sends it inside a transaction the caller
    owns and returns how to read its outcome (the runner's group commit puts many in one, see
    run_together), and `x(...)` runs it alone in a transaction of its own.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect
        self._postgres = dialect.name == "postgresql"
        # The column type's own conversions, as the dialect applies them (SQLite keeps text).
        column_type = UTCDateTime().dialect_impl(dialect)
        to_db = column_type.bind_processor(dialect)
        self._time: Any = to_db if to_db is not None else (lambda value: value)
        from_db = column_type.result_processor(dialect, None)
        self._read_time: Any = from_db if from_db is not None else (lambda value: value)
        # The raw cursors' own parameter styles (SQLAlchemy may use another one itself).
        if dialect.name == "sqlite":
            self._sql = _identity  # sqlite3 accepts :name
        elif dialect.name == "postgresql" and dialect.driver == "psycopg":
            self._sql = _pyformat
        else:
            raise NotImplementedError(
                f"no step writes for {dialect.name}+{dialect.driver}; "
                "use sqlite:/// or postgresql+psycopg://"
            )
        self._dbapi: Any = dialect.loaded_dbapi
        database = engine.url.database
        on_file = dialect.name == "sqlite" and database not in (None, "", ":memory:")
        self._inline_path = database if on_file else None
        self._inline: Any = None
        self._q = {
            name: self._sql(sql)
            for name, sql in {
                "count": _COUNT_ATTEMPTS,
                "start": _BUMP_TO_START,
                "chunk": _BUMP_FOR_CHUNK,
                "advance": _BUMP_TO_ADVANCE,
                "event": _INSERT_EVENT,
                "two_events": _INSERT_TWO_EVENTS,
                "attempt": _INSERT_ATTEMPT,
                "finish": _FINISH_ATTEMPT,
                "notify": _NOTIFY,
                "get": _GET,
                "by_key": _BY_KEY,
                "create": _CREATE,
                "release": _RELEASE,
                "claim": _CLAIM,
                "events_after": _EVENTS_AFTER,
                "record_stop": _RECORD_STOP,
                "interrupt_pending": _INTERRUPT_PENDING,
                "interrupt_owned": _INTERRUPT_OWNED,
                "finish_interrupted": _FINISH_ATTEMPT_INTERRUPTED,
                "pg_advance": _PG_ADVANCE,
                "pg_chunk": _PG_CHUNK,
                "pg_complete": _PG_COMPLETE,
                "pg_claim_and_start": _PG_CLAIM_AND_START,
                "pg_release": _PG_RELEASE,
                "pg_create": _PG_CREATE,
                "pg_start_step": _PG_START_STEP,
                "pg_record_stop": _PG_RECORD_STOP,
                "pg_finish_interrupted": _PG_FINISH_INTERRUPTED,
            }.items()
        }

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A raw DBAPI cursor inside a transaction that commits when the block ends.

        A pooled connection without SQLAlchemy's Connection around it: that wrapper costs more
        than these statements. Pool pre-ping still replaces connections that died, and driver
        errors are re-raised as SQLAlchemy's, which is what callers handle (database lost ->
        UNAVAILABLE, run left for recovery)."""
        with self._raw(autocommit=False) as cursor:
            if not self._postgres:
                cursor.execute("BEGIN IMMEDIATE")  # as database.py's engines do, see there
            yield cursor

    @contextmanager
    def _alone(self) -> Iterator[Any]:
        """Where a write runs on its own: on PostgreSQL each write is one statement, which is
        its own transaction; SQLite's writes are several statements and need a real one."""
        if not self._postgres:
            with self.transaction() as cursor:
                yield cursor
            return
        with self._raw(autocommit=True) as cursor:
            yield cursor

    def run_together(self, writes: Sequence[Together]) -> list[Any]:
        """Run `writes` in one transaction and return their outcomes, in order; any failure
        rolls back all of them and raises (the group commit then retries each alone)."""
        with self.transaction() as cur:
            return [write(cur, *args)() for write, args in writes]

    @contextmanager
    def _raw(self, autocommit: bool) -> Iterator[Any]:
        try:
            fairy = self.engine.raw_connection()
        except self._dbapi.Error as exc:  # cannot even connect: the database is unavailable
            raise DBAPIError.instance(None, None, exc, self._dbapi.Error) from exc
        driver = fairy.driver_connection
        cursor = None
        try:
            if autocommit:
                driver.autocommit = True  # type: ignore[union-attr]
            cursor = fairy.cursor()
            yield cursor
            if not autocommit:
                fairy.commit()
        except self._dbapi.Error as exc:
            self._rollback(fairy)
            if self.engine.dialect.is_disconnect(exc, fairy, cursor):
                fairy.invalidate(exc)
            raise DBAPIError.instance(None, None, exc, self._dbapi.Error) from exc
        except BaseException:
            self._rollback(fairy)
            raise
        finally:
            if cursor is not None:
                cursor.close()
            if autocommit and fairy.is_valid:
                driver.autocommit = False  # type: ignore[union-attr]
            fairy.close()  # back to the pool

    @staticmethod
    def _rollback(fairy: Any) -> None:
        with contextlib.suppress(Exception):  # already gone: the pool replaces it
            fairy.rollback()

    # -------------------------------------------------------------------- inline (SQLite)

    @property
    def writes_inline(self) -> bool:
        """Whether inline() can write here at all (a SQLite file)."""
        return self._inline_path is not None

    def inline(self, fn: Callable[..., Sent[T]], *args: Any) -> T:
        """fn(cursor, *args) in a transaction of its own, right here on the calling (event loop)
        thread, or WouldBlock at once if that would mean waiting.

        Why: a SQLite write of the runner takes about a tenth of a millisecond, while handing it
        to the database thread and back costs about as much again, plus the wake-up of a core
        when the machine is otherwise idle. The runner writes inline when nothing else is
        queued for the database thread, and group-commits otherwise. It never blocks the loop:
        the inline connection does not wait for locks (busy timeout 0) and never checkpoints the
        WAL (the database thread's connections do), so a locked file (the database thread in a
        transaction, a backup, another process) raises WouldBlock and the caller queues the
        write as usual."""
        if self._inline_path is None:
            raise WouldBlock("only SQLite files are written inline")
        connection = self._inline_connection()
        cursor = connection.cursor()
        try:
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except self._dbapi.OperationalError as exc:
                raise WouldBlock(str(exc)) from exc
            try:
                result = fn(cursor, *args)()
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
        except self._dbapi.Error as exc:
            self._drop_inline()
            raise DBAPIError.instance(None, None, exc, self._dbapi.Error) from exc
        finally:
            cursor.close()
        return result

    def _inline_connection(self) -> Any:
        if self._inline is None:
            connection = self._dbapi.connect(self._inline_path, isolation_level=None)
            for pragma in ("busy_timeout=0", "synchronous=NORMAL", "wal_autocheckpoint=0"):
                connection.execute(f"PRAGMA {pragma}")
            self._inline = connection
        return self._inline

    def _drop_inline(self) -> None:
        if self._inline is not None:
            with contextlib.suppress(Exception):
                self._inline.close()
            self._inline = None

    def close(self) -> None:
        self._drop_inline()

    # -------------------------------------------------------------------- reads

    @contextmanager
    def _read(self) -> Iterator[Any]:
        # One SELECT is consistent on its own: no transaction to open (SQLite's connections
        # are in autocommit mode, see database.py) or to commit.
        with self._raw(autocommit=self._postgres) as cursor:
            yield cursor

    def get(self, operation_id: str) -> Operation | None:
        with self._read() as cur:
            return self.get_in(cur, operation_id)

    def events_after(self, operation_id: str, after_seq: int, limit: int) -> list[Event]:
        """Up to `limit` stored events after `after_seq`, in order (replays read pages)."""
        with self._read() as cur:
            cur.execute(
                self._q["events_after"], {"id": operation_id, "after": after_seq, "limit": limit}
            )
            rows = cur.fetchall()
        read_time = self._read_time
        return [
            Event(operation_id, seq, EventKind(kind), json.loads(data), read_time(created_at))
            for seq, kind, data, created_at in rows
        ]

    def get_in(self, cur: Any, operation_id: str) -> Operation | None:
        cur.execute(self._q["get"], {"id": operation_id})
        row = self._row(cur)
        return None if row is None else operation_from_row(row)

    def _row(self, cur: Any) -> SimpleNamespace | None:
        """The next row of an operations query, by column name, with timestamps converted."""
        row = cur.fetchone()
        if row is None:
            return None
        return self._named([column[0] for column in cur.description], row)

    def _named(self, names: Sequence[str], row: Sequence[Any]) -> SimpleNamespace:
        values = dict(zip(names, row, strict=True))
        for name in _TIME_COLUMNS:
            values[name] = self._read_time(values[name])
        return SimpleNamespace(**values)

    # -------------------------------------------------------------------- starting

    def find_by_key(self, owner: str, key: str) -> SimpleNamespace | None:
        """The owner's operation with this idempotency key, as a row (with request_hash)."""
        with self._read() as cur:
            cur.execute(self._q["by_key"], {"owner": owner, "key": key})
            return self._row(cur)

    def create_in(
        self,
        cur: Any,
        operation_id: str,
        columns: dict[str, Any],
        held_until: datetime | None,
        now: datetime,
    ) -> tuple[Operation, Event]:
        """Insert a PENDING operation (`columns`: agent, input, hash, key, owner, labels) with
        its `created` event as seq 1."""
        stamp = self._time(now)
        cur.execute(
            self._q["create"],
            {
                **columns,
                "id": operation_id,
                "held_until": None if held_until is None else self._time(held_until),
                "now": stamp,
            },
        )
        data: dict[str, JSONValue] = {"agent": columns["agent"]}
        event = self._event_in(cur, operation_id, 1, EventKind.CREATED, data, now)
        if held_until is None and self._postgres:
            cur.execute(self._q["notify"], {"channel": WORK, "payload": ""})
        operation = self.get_in(cur, operation_id)
        assert operation is not None
        return operation, event

    def create_statement(
        self,
        operation_id: str,
        columns: dict[str, Any],
        held_until: datetime | None,
        now: datetime,
        announce: bool = True,
    ) -> Statement[tuple[Operation, Event] | None]:
        """create_in as one PostgreSQL statement; None when the idempotency key is taken.
        `announce`: as for release_statement."""
        data: dict[str, JSONValue] = {"agent": columns["agent"]}
        params = {
            **columns,
            "id": operation_id,
            "held_until": None if held_until is None else self._time(held_until),
            "now": self._time(now),
            "data": _dump(data),
            "announce": announce,
        }

        def read(row: Any) -> tuple[Operation, Event] | None:
            if row is None:
                return None
            operation = operation_from_row(self._named(_COLUMNS, row[: len(_COLUMNS)]))
            return operation, Event(operation_id, 1, EventKind.CREATED, data, now)

        return Statement(self._q["pg_create"], params, read)

    def release(self, operation_id: str) -> bool:
        """End a hold: the operation becomes claimable now. False if it was not held."""
        with self.transaction() as cur:
            cur.execute(self._q["release"], {"id": operation_id})
            released = cur.fetchone() is not None
            if released and self._postgres:
                cur.execute(self._q["notify"], {"channel": WORK, "payload": ""})
        return released

    def claim(
        self, operation_id: str, runner_id: str, lease_seconds: float
    ) -> tuple[Operation, Event] | None:
        """Take this PENDING, unheld operation for `runner_id`; None when another runner took
        it first, it is held, or it was stopped."""
        now = datetime.now(UTC)
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "lease": self._time(now + timedelta(seconds=lease_seconds)),
        }
        with self.transaction() as cur:
            cur.execute(self._q["claim"], params)
            row = cur.fetchone()
            if row is None:
                return None
            seq, steps_completed = row
            data: dict[str, JSONValue] = {"from_step": steps_completed, "resumed": False}
            event = self._event_in(cur, operation_id, seq, EventKind.STARTED, data, now)
            operation = self.get_in(cur, operation_id)
        assert operation is not None
        return operation, event

    def release_statement(
        self, operation_id: str, announce: bool = True
    ) -> Statement[Operation | None]:
        """release as one PostgreSQL statement: the released operation, or None if it was not
        held (unknown, already released, or ended). `announce`: tell every replica there is
        work (not needed when this one runs it right away)."""

        def read(row: Any) -> Operation | None:
            if row is None:
                return None
            return operation_from_row(self._named(_COLUMNS, row[: len(_COLUMNS)]))

        return Statement(self._q["pg_release"], {"id": operation_id, "announce": announce}, read)

    def claim_and_start_statement(
        self, operation_id: str, runner_id: str, lease_seconds: float
    ) -> Statement[tuple[Operation, list[Event]] | None]:
        """claim, then start_step of its next step, as one PostgreSQL statement: the operation
        (RUNNING, this runner's) and its [started, step_started] events, or None when another
        runner took it first, it is held, or it was stopped."""
        now = datetime.now(UTC)
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "lease": self._time(now + timedelta(seconds=lease_seconds)),
        }

        def read(row: Any) -> tuple[Operation, list[Event]] | None:
            if row is None:
                return None
            operation = operation_from_row(self._named(_COLUMNS, row[: len(_COLUMNS)]))
            attempt, step, seq = row[len(_COLUMNS)], operation.steps_completed, operation.last_seq
            claimed: dict[str, JSONValue] = {"from_step": step, "resumed": False}
            started: dict[str, JSONValue] = {"step": step, "attempt": attempt}
            return operation, [
                Event(operation_id, seq - 1, EventKind.STARTED, claimed, now),
                Event(operation_id, seq, EventKind.STEP_STARTED, started, now),
            ]

        return Statement(self._q["pg_claim_and_start"], params, read)

    def _notify(self, cursor: Any, operation_id: str, seq: int) -> None:
        # Watchers on other replicas re-read from their last seq, so the newest seq is enough.
        if self._postgres:
            payload = f"{operation_id}:{seq}"
            cursor.execute(self._q["notify"], {"channel": EVENTS, "payload": payload})

    # -------------------------------------------------------------------- a step begins

    def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        with self.transaction() as cur:
            return self.start_step_in(cur, operation_id, step, runner_id)()

    def start_step_in(
        self, cur: Any, operation_id: str, step: int, runner_id: str
    ) -> Sent[Event | None]:
        """Begin `step` (attempt row + step_started), unless a stop is recorded or the operation
        is no longer this runner's."""
        if self._postgres:
            return self._send(cur, self.start_step_statement(operation_id, step, runner_id))
        now = datetime.now(UTC)
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}
        cur.execute(self._q["count"], params)
        attempt = cur.fetchone()[0] + 1
        cur.execute(self._q["start"], params)
        row = cur.fetchone()
        if row is None:
            return _ready(None)
        seq = row[0]
        data: dict[str, JSONValue] = {"step": step, "attempt": attempt}
        cur.execute(
            self._q["event"],
            {**params, "seq": seq, "kind": EventKind.STEP_STARTED.value, "data": _dump(data)},
        )
        cur.execute(self._q["attempt"], {**params, "attempt": attempt})
        self._notify(cur, operation_id, seq)
        return _ready(Event(operation_id, seq, EventKind.STEP_STARTED, data, now))

    def start_step_statement(
        self, operation_id: str, step: int, runner_id: str
    ) -> Statement[Event | None]:
        """start_step as one PostgreSQL statement."""
        now = datetime.now(UTC)
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            data: dict[str, JSONValue] = {"step": step, "attempt": row[1]}
            return Event(operation_id, row[0], EventKind.STEP_STARTED, data, now)

        return Statement(self._q["pg_start_step"], params, read)

    # -------------------------------------------------------------------- output

    def append_chunk(
        self,
        operation_id: str,
        step: int,
        text: str,
        runner_id: str,
        outlives_stop: bool = False,
    ) -> Event | None:
        with self._alone() as cur:
            return self.append_chunk_in(cur, operation_id, step, text, runner_id, outlives_stop)()

    def append_chunk_in(
        self,
        cur: Any,
        operation_id: str,
        step: int,
        text: str,
        runner_id: str,
        outlives_stop: bool = False,
    ) -> Sent[Event | None]:
        """Store an output chunk; None when the operation has ended or changed hands, or a stop
        is recorded (unless `outlives_stop`: the stop-at-boundary mode keeps the step's output)."""
        if self._postgres:
            statement = self.chunk_statement(operation_id, step, text, runner_id, outlives_stop)
            return self._send(cur, statement)
        now = datetime.now(UTC)
        data: dict[str, JSONValue] = {"step": step, "text": text}
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "outlives_stop": outlives_stop,
        }
        cur.execute(self._q["chunk"], params)
        row = cur.fetchone()
        if row is None:
            return _ready(None)
        seq = row[0]
        cur.execute(
            self._q["event"],
            {**params, "seq": seq, "kind": EventKind.OUTPUT_CHUNK.value, "data": _dump(data)},
        )
        return _ready(Event(operation_id, seq, EventKind.OUTPUT_CHUNK, data, now))

    def chunk_statement(
        self,
        operation_id: str,
        step: int,
        text: str,
        runner_id: str,
        outlives_stop: bool = False,
    ) -> Statement[Event | None]:
        """append_chunk as one PostgreSQL statement."""
        now = datetime.now(UTC)
        data: dict[str, JSONValue] = {"step": step, "text": text}
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "outlives_stop": outlives_stop,
        }

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            return Event(operation_id, row[0], EventKind.OUTPUT_CHUNK, data, now)

        return Statement(self._q["pg_chunk"], {**params, "data": _dump(data)}, read)

    @staticmethod
    def _send(cur: Any, statement: Statement[T]) -> Sent[T]:
        cur.execute(statement.sql, statement.params)
        return lambda: statement.read(cur.fetchone())

    # -------------------------------------------------------------------- a step boundary

    def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        with self._alone() as cur:
            return self.advance_in(cur, operation_id, step, output, state, runner_id)()

    def advance_in(
        self,
        cur: Any,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        runner_id: str,
    ) -> Sent[list[Event]]:
        """Checkpoint step `step` (not the last) and begin step + 1, in one transaction.

        Reads [step_completed, step_started], or [step_completed] alone when a stop was
        recorded (the runner then ends the operation at this boundary), or [] when the
        operation is no longer this runner's."""
        if self._postgres:
            return self._send(
                cur, self.advance_statement(operation_id, step, output, state, runner_id)
            )
        _now, params, completed, started, events = self._advancing(
            operation_id, step, output, state, runner_id
        )
        cur.execute(self._q["advance"], params)
        row = cur.fetchone()
        if row is None:
            return _ready([])
        last_seq, go_on = row[0], row[1] is None
        cur.execute(self._q["finish"], params)
        if go_on:
            cur.execute(
                self._q["two_events"],
                {
                    **params,
                    "seq": last_seq - 1,
                    "kind": STEP_COMPLETED.value,
                    "data": _dump(completed),
                    "seq2": last_seq,
                    "kind2": EventKind.STEP_STARTED.value,
                    "data2": _dump(started),
                },
            )
            cur.execute(self._q["attempt"], {**params, "step": step + 1, "attempt": 1})
        else:
            cur.execute(
                self._q["event"],
                {**params, "seq": last_seq, "kind": STEP_COMPLETED.value, "data": _dump(completed)},
            )
        return _ready(events(row))

    def advance_statement(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> Statement[list[Event]]:
        """advance as one PostgreSQL statement."""
        _now, params, completed, started, events = self._advancing(
            operation_id, step, output, state, runner_id
        )
        params.update(data=_dump(completed), data2=_dump(started))
        return Statement(self._q["pg_advance"], params, events)

    def complete_statement(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> Statement[list[Event]]:
        """OperationStore.complete_step of the last step, as one PostgreSQL statement: reads
        [step_completed, completed], [step_completed] alone when a stop was recorded first, or
        [] when the operation is no longer this runner's."""
        now, params, completed, _, _ = self._advancing(operation_id, step, output, state, runner_id)
        finished: dict[str, JSONValue] = {"result": output}
        params.update(data=_dump(completed), data2=_dump(finished))

        def read(row: Any) -> list[Event]:
            if row is None:
                return []
            last_seq, go_on = row[0], row[1] is None
            if not go_on:
                return [Event(operation_id, last_seq, STEP_COMPLETED, completed, now)]
            return [
                Event(operation_id, last_seq - 1, STEP_COMPLETED, completed, now),
                Event(operation_id, last_seq, EventKind.COMPLETED, finished, now),
            ]

        return Statement(self._q["pg_complete"], params, read)

    def _advancing(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> tuple[
        datetime,
        dict[str, Any],
        dict[str, JSONValue],
        dict[str, JSONValue],
        Callable[[Any], list[Event]],
    ]:
        now = datetime.now(UTC)
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "step": step,
            "next_step": step + 1,
            "state": _dump(state),
            "output": _dump(output),
        }
        completed: dict[str, JSONValue] = {"step": step, "output": output}
        # Step + 1 was never begun before: only the runner that completed `step` (this one,
        # under the fencing condition) can begin it, so this is its first attempt.
        started: dict[str, JSONValue] = {"step": step + 1, "attempt": 1}

        def events(row: Any) -> list[Event]:
            """The events a write reported by its row (last_seq, stop recorded) wrote."""
            if row is None:
                return []
            last_seq, go_on = row[0], row[1] is None
            if not go_on:
                return [Event(operation_id, last_seq, STEP_COMPLETED, completed, now)]
            return [
                Event(operation_id, last_seq - 1, STEP_COMPLETED, completed, now),
                Event(operation_id, last_seq, EventKind.STEP_STARTED, started, now),
            ]

        return now, params, completed, started, events

    # -------------------------------------------------------------------- stopping

    def _event_in(
        self,
        cur: Any,
        operation_id: str,
        seq: int,
        kind: EventKind,
        data: dict[str, JSONValue],
        now: datetime,
    ) -> Event:
        cur.execute(
            self._q["event"],
            {
                "id": operation_id,
                "seq": seq,
                "kind": kind.value,
                "data": _dump(data),
                "now": self._time(now),
            },
        )
        self._notify(cur, operation_id, seq)
        return Event(operation_id, seq, kind, data, now)

    def record_stop_in(
        self, cur: Any, operation_id: str, requested_by: str, reason: str, now: datetime
    ) -> list[Event] | None:
        """Record the stop intent: [stop_requested] for a running operation (whose runner is
        then told), [stop_requested, interrupted] for a PENDING one, None when there was nothing
        to record (unknown, already stopping, or ended)."""
        params = {"id": operation_id, "now": self._time(now), "by": requested_by, "reason": reason}
        cur.execute(self._q["record_stop"], params)
        row = cur.fetchone()
        if row is None:
            return None
        seq, status = row
        data: dict[str, JSONValue] = {"requested_by": requested_by, "reason": reason}
        written = [self._event_in(cur, operation_id, seq, EventKind.STOP_REQUESTED, data, now)]
        if status == "PENDING":
            cur.execute(self._q["interrupt_pending"], params)
            halted = cur.fetchone()
            if halted is not None:
                halt: dict[str, JSONValue] = {"mid_step": False, "step": 0, "halt_ms": 0.0}
                written.append(
                    self._event_in(cur, operation_id, halted[0], EventKind.INTERRUPTED, halt, now)
                )
                return written
        if self._postgres:
            cur.execute(self._q["notify"], {"channel": STOPS, "payload": operation_id})
        return written

    def record_stop_statement(
        self, operation_id: str, requested_by: str, reason: str, now: datetime
    ) -> Statement[tuple[Operation, list[Event]] | None]:
        """record_stop_in as one PostgreSQL statement: the operation after the stop and the
        events written, or None when there was nothing to record."""
        data: dict[str, JSONValue] = {"requested_by": requested_by, "reason": reason}
        halt: dict[str, JSONValue] = {"mid_step": False, "step": 0, "halt_ms": 0.0}
        params = {
            "id": operation_id,
            "now": self._time(now),
            "by": requested_by,
            "reason": reason,
            "data": _dump(data),
            "halted": _dump(halt),
        }

        def read(row: Any) -> tuple[Operation, list[Event]] | None:
            if row is None:
                return None
            operation = operation_from_row(self._named(_COLUMNS, row[: len(_COLUMNS)]))
            seq = operation.last_seq
            if operation.status is not OperationStatus.INTERRUPTED:
                return operation, [Event(operation_id, seq, EventKind.STOP_REQUESTED, data, now)]
            return operation, [
                Event(operation_id, seq - 1, EventKind.STOP_REQUESTED, data, now),
                Event(operation_id, seq, EventKind.INTERRUPTED, halt, now),
            ]

        return Statement(self._q["pg_record_stop"], params, read)

    def finish_interrupted_statement(
        self,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None = None,
    ) -> Statement[Event | None]:
        """finish_interrupted_in as one PostgreSQL statement."""
        now = datetime.now(UTC)
        params = {
            "id": operation_id,
            "runner": runner_id,
            "now": self._time(now),
            "step": step,
            "mid_step": mid_step,
            "seen": None if seen_at is None else self._time(seen_at),
        }

        def read(row: Any) -> Event | None:
            if row is None:
                return None
            return Event(operation_id, row[0], EventKind.INTERRUPTED, json.loads(row[1]), now)

        return Statement(self._q["pg_finish_interrupted"], params, read)

    def finish_interrupted(
        self,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None = None,
    ) -> Event | None:
        with self.transaction() as cur:
            return self.finish_interrupted_in(
                cur, operation_id, step, mid_step, runner_id, seen_at
            )()

    def finish_interrupted_in(
        self,
        cur: Any,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None = None,
    ) -> Sent[Event | None]:
        """RUNNING -> INTERRUPTED after this runner halted. halt_ms (see halt_ms()) runs from the
        committed stop: it covers delivery and cancellation, not the gateway's delivery nor the
        stop's own write. `seen_at`: when this runner learned of the committed stop, if it did
        so right away (None: measure from the stored stop time)."""
        if self._postgres:
            statement = self.finish_interrupted_statement(
                operation_id, step, mid_step, runner_id, seen_at
            )
            return self._send(cur, statement)
        now = datetime.now(UTC)
        params = {"id": operation_id, "runner": runner_id, "now": self._time(now), "step": step}
        cur.execute(self._q["interrupt_owned"], params)
        row = cur.fetchone()
        if row is None:
            return _ready(None)
        seq, requested_at = row[0], self._read_time(row[1])
        if mid_step:
            cur.execute(self._q["finish_interrupted"], params)
        data: dict[str, JSONValue] = {
            "mid_step": mid_step,
            "step": step,
            "halt_ms": halt_ms(now, requested_at, seen_at),
        }
        return _ready(self._event_in(cur, operation_id, seq, EventKind.INTERRUPTED, data, now))


def _identity(sql: str) -> str:
    return sql


def _pyformat(sql: str) -> str:
    """:name -> %(name)s, for drivers with the pyformat paramstyle (psycopg)."""
    return re.sub(r"(?<!:):([a-z_0-9]+)", r"%(\1)s", sql)
