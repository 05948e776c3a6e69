"""Operation ids: canonical lowercase UUIDs, checked the same way by both services."""

from __future__ import annotations

import uuid

from stopline.errors import InvalidArgument
from stopline.json_values import shown


def parse_operation_id(value: str, field: str = "operation_id") -> str:
    """Canonical lowercase UUID, or INVALID_ARGUMENT naming the field."""
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        parsed = None
    if parsed is None or str(parsed) != value.lower() or len(value) != 36:
        raise InvalidArgument(
            field, f"{shown(value)} is not an operation id (a UUID such as {uuid.UUID(int=0)})"
        )
    return value.lower()
