"""Limits both services enforce, in plain Python so they are unit-tested without gRPC.

Every refusal names the limit and its value (`...; the limit is 500 (max_page_size)`), so a caller
who hits one knows which setting to ask an operator about. Domain errors only: the status codes
are chosen in stopline/grpc_status.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from google.protobuf import struct_pb2

from stopline.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from stopline.json_values import dump_json, struct_to_python

# Caller text the runtime stores; the gateway checks the same limits before calling it.
MAX_REASON = 1000  # a stop's reason
MAX_REQUESTED_BY = 200  # who asked for a stop
MAX_OWNER = 200  # an operation's owner: the gateway's authenticated principal
# Longest hold of a new operation the runtime accepts (the gateway's --start-hold stays under it).
MAX_HOLD_SECONDS = 60.0

# Defaults of the configurable limits, the same on both services so that the gateway refuses
# exactly what the runtime would (max_input_bytes, max_page_size, max_request_bytes).
DEFAULT_MAX_INPUT_BYTES = 64 * 1024
DEFAULT_MAX_PAGE_SIZE = 500
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024

# Fixed, not configurable: protobuf refuses messages nested past 100 levels, each level of input
# costs two (Struct, Value), and the input is sent on inside Operation and response messages.
# Deeper input would be stored and then fail every response that carries it.
MAX_INPUT_DEPTH = 32


def struct_to_input(value: struct_pb2.Struct, field: str = "input") -> dict[str, Any]:
    """A Struct as plain JSON-able Python (integral numbers as ints), refusing what JSON cannot
    hold (NaN, Infinity)."""
    try:
        return struct_to_python(value)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(field, f"is not JSON: {str(exc)[:200]}") from exc


def json_depth(value: Any) -> int:
    """How many objects and arrays deep `value` nests, without recursion (hostile input)."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        pending.extend((child, depth) for child in children)
    return deepest


def json_size(value: Mapping[str, Any], field: str = "input") -> int:
    """Size of `value` as compact UTF-8 JSON: the one measure of agent input on both services,
    so the gateway refuses exactly what the runtime would."""
    try:
        text = dump_json(value)
    except RecursionError as exc:
        raise InvalidArgument(field, "is nested too deeply") from exc
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(field, f"is not JSON: {exc}") from exc
    return len(text.encode())


def too_deep(field: str = "input", depth: int | None = None) -> InvalidArgument:
    """Input nested past MAX_INPUT_DEPTH. `depth` is None when protobuf itself refused to decode
    the request (its own nesting limit is a few levels above ours), so only a lower bound is
    known; the caller gets the same kind of message either way."""
    how_deep = f"{depth} levels" if depth is not None else f"more than {MAX_INPUT_DEPTH} levels"
    return InvalidArgument(
        field, f"is nested {how_deep} deep; the limit is {MAX_INPUT_DEPTH} levels"
    )


def check_input_size(value: Mapping[str, Any], limit: int, field: str = "input") -> None:
    depth = json_depth(value)
    if depth > MAX_INPUT_DEPTH:
        raise too_deep(field, depth)
    size = json_size(value, field)
    if size > limit:
        raise InvalidArgument(
            field, f"is {size} bytes as JSON; the limit is {limit} bytes (max_input_bytes)"
        )


def check_page_size(page_size: int, limit: int) -> None:
    if page_size < 0:
        raise InvalidArgument("page_size", f"must not be negative, got {page_size}")
    if page_size > limit:
        raise InvalidArgument("page_size", f"is {page_size}; the limit is {limit} (max_page_size)")


def idle_stream_error(idle_seconds: float, last_seq: int) -> DeadlineExceeded:
    """Why a stream with no traffic for `idle_seconds` ended, and how to pick it up again."""
    return DeadlineExceeded(
        f"no event for {idle_seconds:g}s (the limit is {idle_seconds:g}s, stream_idle_seconds); "
        f"the operation goes on: reconnect with after_seq={last_seq}"
    )


class StreamLimiter:
    """Counts open streams overall and per key, refusing one over either cap.

    The key is whoever the caller is: the gateway uses the authenticated principal (see
    gateway_service/servicer.py `_stream_key`). Single-threaded (the event loop) by design: no
    lock is needed between the check and the increment because nothing awaits in between.
    """

    def __init__(self, max_total: int, max_per_key: int | None = None) -> None:
        if max_total < 1 or (max_per_key is not None and max_per_key < 1):
            raise ValueError("stream limits must be at least 1")
        self.max_total = max_total
        self.max_per_key = max_per_key
        self._open: dict[str, int] = {}
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    def count(self, key: str) -> int:
        return self._open.get(key, 0)

    @contextmanager
    def acquire(self, key: str) -> Iterator[None]:
        """Hold a stream slot for `key` while the block runs; ResourceExhausted if none is free."""
        if self._total >= self.max_total:
            raise ResourceExhausted(
                f"this gateway already serves {self._total} streams; the limit is "
                f"{self.max_total} (max_streams); retry later or through another gateway"
            )
        held = self._open.get(key, 0)
        if self.max_per_key is not None and held >= self.max_per_key:
            raise ResourceExhausted(
                f"{key} already has {held} open streams; the limit is {self.max_per_key} "
                "(max_streams_per_principal)"
            )
        self._open[key] = held + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]


# An answer's client-chosen id (AnswerInputRequest.answer_id), and an input request's id.
MAX_ANSWER_ID = 200
MAX_REQUEST_ID = 64
