"""SQLite's statements: the fixed SQL of each write, several of which the write runs in one
transaction (sqlite.py: creating, releasing and stopping; sqlite_steps.py: the runner's writes).
"""

from __future__ import annotations

from runtime_service.storage.sql import Sql

# Owned by this runner and still running: the fencing condition of every runner write.
_OWNED = "id = :id AND status = 'RUNNING' AND runner_id = :runner"

# Held (`:held_if_stopped`, see stopped_ahead_hold) when a live stop by its key is already
# committed, so no runner claims it before the start applies that stop.
CREATE = Sql("""
INSERT INTO operations (id, agent, input_json, request_hash, idempotency_key, owner, labels_json,
  status, steps_completed, last_seq, held_until, created_at, updated_at, deadline_at, max_steps,
  trace_parent)
VALUES (:id, :agent, :input, :hash, :key, :owner, :labels, 'PENDING', 0, 1,
  CASE WHEN EXISTS (SELECT 1 FROM stop_tombstones
    WHERE owner = :owner AND idempotency_key = :key AND expires_at > :now)
  THEN :held_if_stopped ELSE :held_until END,
  :now, :now, :deadline_at, :max_steps, :trace_parent)
RETURNING *""")

RELEASE = Sql("""
UPDATE operations SET held_until = NULL
WHERE id = :id AND status = 'PENDING' AND held_until IS NOT NULL
RETURNING *""")

# The stop intent, recorded once, on an operation that has not ended, in two statements that
# the stop runs in turn. A RUNNING operation's (the one a client waits on) sets no indexed
# column: SQLite rewrites the entries of every index on a column a SET names, changed or not,
# so one statement for every status (status and finished_at set by CASE) rewrote three indexes'
# entries and doubled the pages the stop's commit writes. One that is not RUNNING (PENDING,
# WAITING, PAUSED: no step in flight) is interrupted by the second, in the same write.
RECORD_STOP_RUNNING = Sql("""
UPDATE operations SET
  last_seq = last_seq + 1,
  updated_at = :now, stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason,
  stop_cause = :cause
WHERE id = :id AND status = 'RUNNING'
  AND stop_requested_at IS NULL AND (:owner = '' OR owner = :owner)
RETURNING *""")

RECORD_STOP_IDLE = Sql("""
UPDATE operations SET
  last_seq = last_seq + 2,
  updated_at = :now, stop_requested_at = :now, stop_requested_by = :by, stop_reason = :reason,
  stop_cause = :cause, status = 'INTERRUPTED', finished_at = :now
WHERE id = :id AND status IN ('PENDING', 'WAITING', 'PAUSED')
  AND stop_requested_at IS NULL AND (:owner = '' OR owner = :owner)
RETURNING *""")

# A PENDING operation never has a stop recorded (recording one interrupts it), so the claim is
# always followed by its first step.
_CLAIM = """
UPDATE operations SET status = 'RUNNING', runner_id = :runner, lease_expires_at = :lease,
  held_until = NULL, last_seq = last_seq + 2, updated_at = :now
WHERE id = :id AND status = 'PENDING' AND {claimable}
RETURNING *"""
CLAIM = Sql(_CLAIM.format(claimable="(held_until IS NULL OR held_until <= :now)"))
# A held start's release and its claim in one write (see postgres_sql._claim_and_start).
RELEASE_AND_CLAIM = Sql(_CLAIM.format(claimable="held_until IS NOT NULL"))

# Not among the operations this runner runs, their ids bound as one JSON array (SQLite has no
# array type; json_each reads it as rows): the claim's condition (SqliteStorage._not_among).
NOT_AMONG = "operations.id NOT IN (SELECT value FROM json_each(:not_among))"

# Anything a claim could take (claims._pending_unheld or claims._running_lease_lapsed, and
# NOT_AMONG), read with no write lock: see SqliteStorage._maybe_claimable.
ANY_CLAIMABLE = Sql(f"""
SELECT 1 FROM operations
WHERE ((status = 'PENDING' AND (held_until IS NULL OR held_until <= :now))
    OR (status = 'RUNNING' AND (lease_expires_at IS NULL OR lease_expires_at <= :now)))
  AND {NOT_AMONG}
LIMIT 1""")

NEXT_ATTEMPT = Sql("SELECT count(*) + 1 FROM steps WHERE operation_id = :id AND step = :step")

BUMP_TO_START = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
WHERE {_OWNED} AND stop_requested_at IS NULL
RETURNING last_seq""")

# An event of the step in flight (every kind: output, deltas, agent events, tool call records).
# Output is stored only while no stop is recorded, so once a stop_requested event is stored no
# output follows it, only the halt. `:outlives_stop` lifts that for records allowed between the
# stop and the halt (settling tool calls, deltas passed before the stop reached the step) and
# for the stop-at-boundary mode, where the step in flight runs to its end and its output is kept.
BUMP_TO_APPEND = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now
WHERE {_OWNED} AND (stop_requested_at IS NULL OR :outlives_stop)
RETURNING last_seq, stop_requested_at""")

# Checkpoint step N and, unless a stop is recorded, begin step N+1: one seq for step_completed,
# a second for step_started only when no stop is recorded (the stop wins at the boundary).
BUMP_TO_ADVANCE = Sql(f"""
UPDATE operations SET
  last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
  steps_completed = :next_step, agent_state_json = :state, updated_at = :now
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at""")

# The last step: checkpoint it and complete the operation, unless a stop was recorded first
# (then only the checkpoint: the stop wins, and the runner halts at this boundary).
BUMP_TO_COMPLETE = Sql(f"""
UPDATE operations SET
  last_seq = last_seq + CASE WHEN stop_requested_at IS NULL THEN 2 ELSE 1 END,
  steps_completed = :next_step, agent_state_json = :state, updated_at = :now,
  status = CASE WHEN stop_requested_at IS NULL THEN 'COMPLETED' ELSE status END,
  result_json = CASE WHEN stop_requested_at IS NULL THEN :output ELSE result_json END,
  finished_at = CASE WHEN stop_requested_at IS NULL THEN :now ELSE finished_at END
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at""")

# `:state`: the state the cut step kept for a stop (NULL: the last checkpoint's stays).
HALT = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  status = 'INTERRUPTED', finished_at = :now,
  agent_state_json = coalesce(:state, agent_state_json)
WHERE {_OWNED}
RETURNING last_seq, stop_requested_at, stop_cause""")

FAIL = Sql(f"""
UPDATE operations SET last_seq = last_seq + 1, updated_at = :now,
  status = 'FAILED', error = :error, finished_at = :now
WHERE {_OWNED}
RETURNING last_seq""")

EVENT = Sql("""
INSERT INTO events (operation_id, seq, kind, data_json, created_at)
VALUES (:id, :seq, :kind, :data, :now)""")

TWO_EVENTS = Sql("""
INSERT INTO events (operation_id, seq, kind, data_json, created_at)
VALUES (:id, :seq, :kind, :data, :now), (:id, :seq + 1, :kind2, :data2, :now)""")

ATTEMPT = Sql("""
INSERT INTO steps (operation_id, step, attempt, runner_id, started_at)
VALUES (:id, :step, :attempt, :runner, :now)""")

# Only the newest attempt is this runner's (older ones were settled as abandoned at takeover).
FINISH_ATTEMPT = Sql("""
UPDATE steps SET finished_at = :now, outcome = :outcome, output_json = :output
WHERE operation_id = :id AND step = :step AND finished_at IS NULL
  AND attempt = (SELECT max(attempt) FROM steps WHERE operation_id = :id AND step = :step)""")

# The ids as one JSON array (SQLite has no array type; json_each reads it as rows). The intents
# come back as they are stored: SQLite 3.40 evaluated `stop_requested_at IS NOT NULL` in this
# RETURNING as true for every row, NULL or not, so every renewal reported every operation as
# stopping and the runner read each one back (storage.claims decides from the values instead).
RENEW_LEASES = Sql("""
UPDATE operations SET lease_expires_at = :until
WHERE id IN (SELECT value FROM json_each(:ids)) AND runner_id = :runner AND status = 'RUNNING'
RETURNING id, stop_requested_at, pause_requested_at""")
