"""Opaque page tokens for ListOperations.

A token is the keyset position of the last item served plus the filter it was served under, so a
token replayed with another filter is rejected instead of silently skipping or repeating items.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from runtime_service.storage.interface import ListCursor
from stopline.errors import InvalidArgument


def encode_page_token(cursor: ListCursor, status: str | None) -> str:
    raw = json.dumps({"t": cursor.created_at.isoformat(), "i": cursor.id, "s": status or ""})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, status: str | None) -> ListCursor:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        cursor = ListCursor(datetime.fromisoformat(data["t"]), str(data["i"]))
        issued_for = str(data["s"])
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            "page_token", "is not a token returned by ListOperations; pass next_page_token as is"
        ) from exc
    if cursor.created_at.tzinfo is None:
        raise InvalidArgument("page_token", "is not a token returned by ListOperations")
    if issued_for != (status or ""):
        raise InvalidArgument(
            "page_token", "was issued for a different status filter; keep the filter across pages"
        )
    return cursor
