"""The `stopline_events` payload: "id:seq", or "id:seq:note" carrying the event itself."""

from __future__ import annotations

import uuid

from runtime_service.domain import EventKind
from runtime_service.notifications import MAX_NOTE_BYTES, event_note, parse_event_payload
from runtime_service.storage import utcnow


def test_a_carried_event_round_trips_and_a_bare_payload_carries_none() -> None:
    op_id, now = str(uuid.uuid4()), utcnow()
    data = {"requested_by": "ana: ops", "reason": "stop: now", "cause": "USER"}
    note = event_note(EventKind.STOP_REQUESTED, data, now)
    parsed_id, seq, event = parse_event_payload(f"{op_id}:7:{note}")
    assert (parsed_id, seq) == (op_id, 7)
    assert event is not None
    assert (event.operation_id, event.seq, event.kind) == (op_id, 7, EventKind.STOP_REQUESTED)
    assert event.data == data and event.created_at == now
    assert parse_event_payload(f"{op_id}:8") == (op_id, 8, None)


def test_an_event_too_large_for_a_notification_is_not_carried() -> None:
    """PostgreSQL refuses a payload over 8000 bytes, which would fail the stop's own write."""
    wide = "é" * MAX_NOTE_BYTES  # two bytes each in UTF-8
    assert event_note(EventKind.STOP_REQUESTED, {"reason": wide}, utcnow()) == ""
