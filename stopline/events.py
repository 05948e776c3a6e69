"""Kinds of event, as both services and the command name them: the fields of the Event oneof
in operation.proto (`event.WhichOneof("kind")` gives one of these strings)."""

from __future__ import annotations

import enum


class EventKind(enum.StrEnum):
    CREATED = "created"
    STARTED = "started"
    STEP_STARTED = "step_started"
    OUTPUT_CHUNK = "output_chunk"
    STEP_COMPLETED = "step_completed"
    STOP_REQUESTED = "stop_requested"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    TEXT_DELTA = "text_delta"
    TOOL_CALL_STARTED = "tool_call_started"
    TOOL_CALL_FINISHED = "tool_call_finished"
    TOOL_CALL_FAILED = "tool_call_failed"
    TOOL_CALL_CANCELLED = "tool_call_cancelled"
    TOOL_CALL_OUTCOME_UNKNOWN = "tool_call_outcome_unknown"
    AGENT_EVENT = "agent_event"
    INPUT_REQUESTED = "input_requested"
    INPUT_ANSWERED = "input_answered"
    PAUSE_REQUESTED = "pause_requested"
    PAUSED = "paused"
    RESUMED = "resumed"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENT_KINDS


# The last event of every operation; a StrEnum equals its value, so a plain kind string from
# `WhichOneof` can be looked up here directly.
TERMINAL_EVENT_KINDS: frozenset[str] = frozenset(
    {EventKind.COMPLETED, EventKind.FAILED, EventKind.INTERRUPTED}
)

# The records that end a tool call: every tool_call_started is followed by exactly one of these
# with the same call_id.
TOOL_CALL_ENDINGS: frozenset[str] = frozenset(
    {
        EventKind.TOOL_CALL_FINISHED,
        EventKind.TOOL_CALL_FAILED,
        EventKind.TOOL_CALL_CANCELLED,
        EventKind.TOOL_CALL_OUTCOME_UNKNOWN,
    }
)
