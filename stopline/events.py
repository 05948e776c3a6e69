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

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENT_KINDS


# The last event of every operation; a StrEnum equals its value, so a plain kind string from
# `WhichOneof` can be looked up here directly.
TERMINAL_EVENT_KINDS: frozenset[str] = frozenset(
    {EventKind.COMPLETED, EventKind.FAILED, EventKind.INTERRUPTED}
)
