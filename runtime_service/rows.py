"""Stored operation rows -> domain values, shared by storage's SQLAlchemy Core reads and its raw
cursors.

`row` is anything with the columns as attributes (a SQLAlchemy Row, or a namespace built from a
DBAPI cursor), with timestamps already converted to aware datetimes.
"""

from __future__ import annotations

import json
from typing import Any

from runtime_service.domain import (
    JSONValue,
    Operation,
    OperationStatus,
    StopCause,
    StopIntent,
)


def load_json(text: str | None) -> JSONValue:
    return None if text is None else json.loads(text)


def operation_from_row(row: Any) -> Operation:
    stop = None
    if row.stop_requested_at is not None:
        cause = StopCause(row.stop_cause) if row.stop_cause else None
        stop = StopIntent(
            row.stop_requested_at, row.stop_requested_by or "", row.stop_reason or "", cause
        )
    return Operation(
        id=row.id,
        agent=row.agent,
        input=load_json(row.input_json),
        idempotency_key=row.idempotency_key,
        labels=load_json(row.labels_json) or {},
        status=OperationStatus(row.status),
        steps_completed=row.steps_completed,
        agent_state=load_json(row.agent_state_json),
        last_seq=row.last_seq,
        result=load_json(row.result_json),
        error=row.error,
        stop=stop,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        owner=row.owner,
        deadline_at=row.deadline_at,
        max_steps=row.max_steps,
        events_expired_at=row.events_expired_at,
        trace_parent=row.trace_parent,
        input_request_id=row.input_request_id,
        pause_requested_at=row.pause_requested_at,
    )
