"""Operation ids: canonical lowercase UUIDs, checked the same way by both services."""

from __future__ import annotations

import uuid

from stopline.errors import InvalidArgument


def parse_operation_id(value: str, field: str = "operation_id") -> str:
    """Canonical lowercase UUID, or INVALID_ARGUMENT naming the field."""
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        parsed = None
    if parsed is None or str(parsed) != value.lower() or len(value) != 36:
        shown = value if len(value) <= 64 else value[:64] + "…"
        raise InvalidArgument(
            field, f"{shown!r} is not an operation id (a UUID such as {uuid.UUID(int=0)})"
        )
    return value.lower()
