"""Plain value types of the runtime: statuses, operations, events.

These are what storage returns and the step loop manipulates; translation to and from protobuf
happens only in runtime_service.convert, so the core never depends on the wire format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Event kinds are a wire fact both services share (stopline/events.py); re-exported here for the
# runtime's modules.
from stopline.events import EventKind as EventKind

JSONValue = Any
"""Anything json.dumps accepts: the agent input, state and outputs."""


class OperationStatus(enum.StrEnum):
    """Stored status. STOPPING is not here: it is RUNNING with a stop intent recorded."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"
    # Waiting for a person's answer to an input request: holds no runner slot, only its rows.
    WAITING = "WAITING"
    # Paused by an operator: no step runs until it is resumed.
    PAUSED = "PAUSED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {OperationStatus.COMPLETED, OperationStatus.FAILED, OperationStatus.INTERRUPTED}
)


class InterruptOutcome(enum.StrEnum):
    """What one InterruptOperation call achieved."""

    ACCEPTED = "ACCEPTED"
    ALREADY_REQUESTED = "ALREADY_REQUESTED"
    ALREADY_FINISHED = "ALREADY_FINISHED"
    SKIPPED_WATCHED = "SKIPPED_WATCHED"
    # A stop by idempotency key found no operation with that key: it waits, as a tombstone, for
    # the start that brings the key, which then creates the operation already INTERRUPTED.
    RECORDED_AHEAD = "RECORDED_AHEAD"


@dataclass(frozen=True, slots=True)
class StopIntent:
    """Who asked for a stop, when and why; stored in columns no step write touches."""

    requested_at: datetime
    requested_by: str
    reason: str
    cause: StopCause | None = None  # None: recorded before causes existed


class StopCause(enum.StrEnum):
    """Why an operation was stopped (a closed set; the proto's StopCause without its prefix)."""

    USER = "USER"
    CLIENT_GONE = "CLIENT_GONE"
    GRACE_EXPIRED = "GRACE_EXPIRED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    STEP_BUDGET = "STEP_BUDGET"
    OPERATOR = "OPERATOR"
    BULK = "BULK"


@dataclass(frozen=True, slots=True)
class Operation:
    id: str
    agent: str
    input: JSONValue
    idempotency_key: str | None
    labels: dict[str, str]
    status: OperationStatus
    steps_completed: int
    agent_state: JSONValue
    last_seq: int
    result: JSONValue
    error: str | None
    stop: StopIntent | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    owner: str = ""
    # Limits set at start: stopped by the runtime at this time / after this many steps.
    deadline_at: datetime | None = None
    max_steps: int | None = None
    # When retention deleted its events and step records (None: they are kept).
    events_expired_at: datetime | None = None
    # The start's W3C traceparent (tracing on at the start), continued by the operation's runs.
    trace_parent: str | None = None
    # The newest input request a step made (open while WAITING), and a pause requested while a
    # step ran that its runner has not landed yet.
    input_request_id: str | None = None
    pause_requested_at: datetime | None = None

    @property
    def is_stopping(self) -> bool:
        """RUNNING with a stop recorded: reported to clients as STOPPING."""
        return self.status is OperationStatus.RUNNING and self.stop is not None


@dataclass(frozen=True, slots=True)
class Event:
    operation_id: str
    seq: int
    kind: EventKind
    data: dict[str, JSONValue]
    created_at: datetime

    @property
    def is_terminal(self) -> bool:
        return self.kind.is_terminal


@dataclass(frozen=True, slots=True)
class InterruptResult:
    outcome: InterruptOutcome
    operation: Operation
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordedAhead:
    """A stop by idempotency key that found no operation with the key: stored as a tombstone
    (outcome RECORDED_AHEAD), or one was stored already (ALREADY_REQUESTED)."""

    outcome: InterruptOutcome


# --- waiting for a person ---------------------------------------------------------------------


class AnswerOutcome(enum.StrEnum):
    """What one AnswerInput call achieved (every other case is an error: see waiting.py)."""

    ACCEPTED = "ACCEPTED"
    ALREADY_ANSWERED = "ALREADY_ANSWERED"  # the same answer id had won already


class PauseOutcome(enum.StrEnum):
    ACCEPTED = "ACCEPTED"
    ALREADY_PAUSED = "ALREADY_PAUSED"
    ALREADY_FINISHED = "ALREADY_FINISHED"
    STOPPING = "STOPPING"  # a stop is recorded: it wins


class ResumeOutcome(enum.StrEnum):
    ACCEPTED = "ACCEPTED"
    NOT_PAUSED = "NOT_PAUSED"
    ALREADY_FINISHED = "ALREADY_FINISHED"


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """An input request as stored: `data` is its input_requested event's data; `outcome` is
    'open', 'answered' or 'expired'; `answer` the winning (or default) answer once resolved."""

    operation_id: str
    request_id: str
    step: int
    kind: str
    data: dict[str, Any]
    schema: dict[str, Any] | None
    default: dict[str, Any]
    expires_at: datetime
    outcome: str
    answer_id: str | None
    answer: dict[str, Any] | None
    answered_by: str | None
    resolved_at: datetime | None

    @property
    def resolution(self) -> dict[str, Any]:
        """The input_answered event's data for this (resolved) request."""
        return {
            "step": self.step,
            "request_id": self.request_id,
            "answer_id": self.answer_id or "",
            "answer": self.answer,
            "answered_by": self.answered_by or "",
            "expired": self.outcome == "expired",
        }


@dataclass(frozen=True, slots=True)
class AnswerResult:
    """An answer's effect: `request` as it now stands; `won`: this call's answer won now."""

    request: StoredRequest
    operation: Operation
    won: bool
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class PauseResult:
    outcome: PauseOutcome
    operation: Operation
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class ResumeResult:
    outcome: ResumeOutcome
    operation: Operation
    events: tuple[Event, ...] = ()
