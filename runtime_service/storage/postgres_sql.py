"""PostgreSQL's statements: each write of the storage is one statement here (data-modifying CTEs
all run, against one snapshot, in the statement's own transaction), with each parameter's type
beside its text; postgres.py runs them through the batcher and reads what they return.
"""

from __future__ import annotations

from runtime_service.notifications import BUCKET_DIGITS, EVENTS_PREFIX, STOPS, WORK
from runtime_service.storage.cursors import COLUMN_LIST
from runtime_service.storage.sql import PgSql, Sql

TEXT, INT, BOOL, TIME = "text", "integer", "boolean", "timestamptz"


def _one_row(conditions: str) -> str:
    """The WHERE of a write to one operation: the row found by its primary key, `conditions`
    checked on it. `IS TRUE` keeps them from being used to find the row: a prepared
    statement's generic plan, made while the table was new and unanalyzed, used the index on
    (status, deadline_at) for `status = 'RUNNING'` and kept it, so every write scanned every
    running operation (with 1,500 running, a batch of writes took 50-500 ms)."""
    return f"id = :id AND ({conditions}) IS TRUE"


# Owned by this runner and still running: the fencing condition of every runner write.
_OWNED = _one_row("status = 'RUNNING' AND runner_id = :runner")
_OWNED_TYPES = {"id": TEXT, "runner": TEXT, "now": TIME}
# Watchers on other replicas listen on the channels of the operations they watch: the events
# channel of an operation is named by its id's first hex digits (notifications.events_channel).
_EVENTS_CHANNEL = f"'{EVENTS_PREFIX}' || left(:id, {BUCKET_DIGITS})"
_NOTIFY_EVENT = f"pg_notify({_EVENTS_CHANNEL}, :id || ':' || last_seq)"


def _finish_attempt(outcome: str, output: str = "NULL", when: str = "TRUE") -> str:
    """A CTE that settles the newest attempt at :step, in a statement whose `op` CTE wrote the
    operation (only the newest attempt is this runner's: older ones were settled as abandoned
    when it took the operation over)."""
    return f"""finished AS (
  UPDATE steps SET finished_at = :now, outcome = '{outcome}', output_json = {output}
  WHERE {when} AND operation_id = :id AND step = :step AND finished_at IS NULL
    AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)
    AND EXISTS (SELECT 1 FROM op)
)"""


# A new operation and its `created` event; no row when the owner's idempotency key is taken.
# Held (`:held_if_stopped`, see stopped_ahead_hold) when a live stop by its key is already
# committed, so no runner claims it, nor hears of it, before the start applies that stop. (The
# casts: an untyped :key or :owner would be deduced varchar by the INSERT and text by `=`.)
CREATE = PgSql(
    f"""
WITH created AS (
  INSERT INTO operations (id, agent, input_json, request_hash, idempotency_key, owner,
    labels_json, status, steps_completed, last_seq, held_until, created_at, updated_at,
    deadline_at, max_steps, trace_parent)
  VALUES (:id, :agent, :input, :hash, :key, :owner, :labels, 'PENDING', 0, 1,
    CASE WHEN EXISTS (SELECT 1 FROM stop_tombstones
      WHERE owner = :owner::varchar AND idempotency_key = :key::varchar AND expires_at > :now)
    THEN :held_if_stopped::timestamptz ELSE :held_until END,
    :now, :now, :deadline_at, :max_steps, :trace_parent)
  ON CONFLICT (owner, idempotency_key) DO NOTHING
  RETURNING {COLUMN_LIST}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT id, 1, 'created', :data, :now FROM created
)
SELECT {COLUMN_LIST}, CASE WHEN :announce AND held_until IS NULL THEN pg_notify('{WORK}', '') END
FROM created""",
    id=TEXT, agent=TEXT, input=TEXT, hash=TEXT, key=TEXT, owner=TEXT, labels=TEXT,
    held_until=TIME, held_if_stopped=TIME, now=TIME, data=TEXT, announce=BOOL, deadline_at=TIME,
    max_steps=INT, trace_parent=TEXT,
)  # fmt: skip

# A start's look for a stop by its key recorded ahead of it, after its create committed (see
# PostgresStorage.create): read, not taken; TAKE_TOMBSTONE_AND_STOP takes it with its stop.
PEEK_TOMBSTONE = PgSql(
    """
SELECT requested_by, reason, cause FROM stop_tombstones
WHERE owner = :owner AND idempotency_key = :key AND expires_at > :now""",
    owner=TEXT, key=TEXT, now=TIME,
)  # fmt: skip

RELEASE = PgSql(
    f"""
WITH released AS (
  UPDATE operations SET held_until = NULL
  WHERE {_one_row("status = 'PENDING' AND held_until IS NOT NULL")}
  RETURNING {COLUMN_LIST}
)
SELECT {COLUMN_LIST}, CASE WHEN :announce THEN pg_notify('{WORK}', '') END FROM released""",
    id=TEXT, announce=BOOL,
)  # fmt: skip


def _record_stop(taking: bool) -> PgSql:
    """The stop intent, recorded once. An operation with no step in flight (PENDING, WAITING,
    PAUSED) is interrupted in the same UPDATE (SET sees the old row, so `status` there is the
    status before the stop); a RUNNING one's runner is told, and the `stop_requested` event
    travels in its notification (`:note`, see notifications.event_note). `taking`: the stop of
    a tombstone (a stop by the operation's key, stored before its start), deleted in the same
    statement, so that the stop is recorded if and only if the tombstone goes: a failed
    statement leaves it for the start's retry. Nothing is recorded if the tombstone has gone
    meanwhile (the stop by key found the operation and recorded its stop itself)."""
    taken = (
        """taken AS (
  DELETE FROM stop_tombstones WHERE owner = :owner AND idempotency_key = :key RETURNING 1
), """
        if taking
        else ""
    )
    only_if_taken = "AND EXISTS (SELECT 1 FROM taken)" if taking else ""
    keyed = {"key": TEXT} if taking else {}
    return PgSql(
        f"""
WITH {taken}stopped AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN status <> 'RUNNING' THEN 2 ELSE 1 END,
    updated_at = :now, stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason,
    stop_cause = :cause,
    status = CASE WHEN status <> 'RUNNING' THEN 'INTERRUPTED' ELSE status END,
    finished_at = CASE WHEN status <> 'RUNNING' THEN :now ELSE finished_at END
  WHERE {_one_row("status IN ('PENDING', 'RUNNING', 'WAITING', 'PAUSED')")}
  AND stop_requested_at IS NULL AND (:owner = '' OR owner = :owner) {only_if_taken}
  RETURNING {COLUMN_LIST}
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN status = 'INTERRUPTED' THEN 1 ELSE 0 END, 'stop_requested',
    :data, :now FROM stopped
  UNION ALL
  SELECT :id, last_seq, 'interrupted', :halted, :now FROM stopped WHERE status = 'INTERRUPTED'
)
SELECT {COLUMN_LIST},
  CASE WHEN status = 'RUNNING' AND :note <> ''
    THEN pg_notify({_EVENTS_CHANNEL}, :id || ':' || last_seq || ':' || :note)
    ELSE {_NOTIFY_EVENT} END,
  CASE WHEN status = 'RUNNING' AND :tell_runners THEN pg_notify('{STOPS}',
    CASE WHEN :note <> '' THEN :id || ':' || last_seq || ':' || :note ELSE :id END) END
FROM stopped""",
        id=TEXT, now=TIME, by=TEXT, reason=TEXT, cause=TEXT, data=TEXT, halted=TEXT, owner=TEXT,
        note=TEXT, tell_runners=BOOL,
        **keyed,
    )  # fmt: skip


RECORD_STOP = _record_stop(taking=False)
TAKE_TOMBSTONE_AND_STOP = _record_stop(taking=True)


def _claim_and_start(release: bool) -> PgSql:
    """Claim a locally started operation and begin its first step; a PENDING operation never
    has a stop recorded (recording one interrupts it), so the step always begins. `release`:
    the operation must be held (a held start's release, and its claim, in one write), instead
    of unheld or held no longer."""
    claimable = (
        "held_until IS NOT NULL" if release else "(held_until IS NULL OR held_until <= :now)"
    )
    return PgSql(
        f"""
WITH claimed AS (
  UPDATE operations SET status = 'RUNNING', runner_id = :runner, lease_expires_at = :lease,
    held_until = NULL, last_seq = last_seq + 2, updated_at = :now
  WHERE {_one_row(f"status = 'PENDING' AND {claimable}")}
  RETURNING {COLUMN_LIST}
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
SELECT {COLUMN_LIST}, attempt.n, {_NOTIFY_EVENT}
FROM claimed, attempt""",
        **_OWNED_TYPES, lease=TIME,
    )  # fmt: skip


CLAIM_AND_START = _claim_and_start(release=False)
RELEASE_AND_START = _claim_and_start(release=True)

START_STEP = PgSql(
    f"""
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
SELECT last_seq, attempt.n, {_NOTIFY_EVENT} FROM op, attempt""",
    **_OWNED_TYPES, step=INT,
)  # fmt: skip

# An event of the step in flight (every kind: output, deltas, agent events, tool call records).
# Output is stored only while no stop is recorded, so once a stop_requested event is stored no
# output follows it, only the halt. `:outlives_stop` lifts that for records allowed between the
# stop and the halt (settling tool calls, deltas passed before the stop reached the step) and
# for the stop-at-boundary mode, where the step in flight runs to its end and its output is kept.
APPEND = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
  WHERE {_OWNED} AND (stop_requested_at IS NULL OR :outlives_stop)
  RETURNING last_seq, stop_requested_at IS NOT NULL AS stopping
), written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, :kind, :data, :now FROM op
)
SELECT last_seq, stopping, {_NOTIFY_EVENT} FROM op""",
    **_OWNED_TYPES, outlives_stop=BOOL, kind=TEXT, data=TEXT,
)  # fmt: skip


def _boundary(go_on: str, kind: str) -> PgSql:
    """Checkpoint step :step and, unless a stop is recorded, go on (`go_on`: what else the
    operation's UPDATE sets; `kind`: the event of going on): one seq for step_completed, a
    second for going on only when no stop is recorded (the stop wins at the boundary)."""
    began = (
        """began AS (
  INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
  SELECT :id, :next_step, 1, :runner, :now FROM op WHERE go
), """
        if kind == "step_started"
        else ""
    )
    return PgSql(
        f"""
WITH op AS (
  UPDATE operations SET
    last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
    steps_completed = :next_step, agent_state_json = :state, updated_at = :now{go_on}
  WHERE {_OWNED}
  RETURNING last_seq, stop_requested_at IS NULL AS go
), {_finish_attempt("completed", ":output")}, {began}written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq - CASE WHEN go THEN 1 ELSE 0 END, 'step_completed', :data, :now FROM op
  UNION ALL
  SELECT :id, last_seq, '{kind}', :data2, :now FROM op WHERE go
)
SELECT last_seq, go, {_NOTIFY_EVENT} FROM op""",
        **_OWNED_TYPES, step=INT, next_step=INT, state=TEXT, output=TEXT, data=TEXT, data2=TEXT,
    )  # fmt: skip


# Checkpoint a step that was not the last and begin the next (its first attempt: only the runner
# that completed the step before it, this one under the fencing condition, can begin it).
ADVANCE = _boundary("", "step_started")
# Checkpoint the last step and complete the operation, unless a stop was recorded first.
COMPLETE = _boundary(
    """,
    status = CASE WHEN stop_requested_at IS NULL THEN 'COMPLETED' ELSE status END,
    result_json = CASE WHEN stop_requested_at IS NULL THEN :output ELSE result_json END,
    finished_at = CASE WHEN stop_requested_at IS NULL THEN :now ELSE finished_at END""",
    "completed",
)

# The event's data is built here, where the stored stop time is: halt_ms as halt_ms() computes
# it, from the later of the stored stop time and :seen (whole microseconds, so three decimals are
# exact).
HALT = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
    status = 'INTERRUPTED', finished_at = :now,
    agent_state_json = coalesce(:state, agent_state_json)
  WHERE {_OWNED}
  RETURNING last_seq,
    '{{"mid_step":' || CASE WHEN :mid_step THEN 'true' ELSE 'false' END || ',"step":' || :step
    || ',"halt_ms":' || coalesce(round(
      greatest(0, extract(epoch FROM :now - greatest(stop_requested_at, :seen)) * 1000), 3), 0)
    || coalesce(',"cause":"' || stop_cause || '"', '') || '}}' AS data
), {_finish_attempt("interrupted", when=":mid_step")}, written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'interrupted', data, :now FROM op
)
SELECT last_seq, data, {_NOTIFY_EVENT} FROM op""",
    **_OWNED_TYPES, step=INT, mid_step=BOOL, seen=TIME, state=TEXT,
)  # fmt: skip

FAIL = PgSql(
    f"""
WITH op AS (
  UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
    status = 'FAILED', error = :error, finished_at = :now
  WHERE {_OWNED}
  RETURNING last_seq
), {_finish_attempt("failed")}, written AS (
  INSERT INTO events (operation_id, seq, kind, data_json, created_at)
  SELECT :id, last_seq, 'failed', :data, :now FROM op
)
SELECT last_seq, {_NOTIFY_EVENT} FROM op""",
    **_OWNED_TYPES, step=INT, error=TEXT, data=TEXT,
)  # fmt: skip

# The rows are locked in id order first, as the batcher does (pg_batch), so that a renewal
# and a batch of step writes never wait for each other in a cycle (PostgreSQL would break
# such a deadlock only after a second).
RENEW_LEASES = Sql("""
UPDATE operations SET lease_expires_at = :until
WHERE id IN (
    SELECT id FROM operations
    WHERE id = ANY(:ids) AND runner_id = :runner AND status = 'RUNNING'
    ORDER BY id FOR UPDATE)
  AND runner_id = :runner AND status = 'RUNNING'
RETURNING id, stop_requested_at, pause_requested_at""")
