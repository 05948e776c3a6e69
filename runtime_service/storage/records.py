"""What both dialects' writes put in a record the same way: a stop's and a halt's event data,
a start's fingerprint and deadline, the hold of a start stopped ahead, the time now. Apart from
the interface (interface.py), which says what storage is asked, not what its rows hold."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from runtime_service.domain import (
    InterruptOutcome,
    InterruptResult,
    JSONValue,
    Operation,
    StopCause,
)

ABANDONED = "abandoned"
"""Outcome of an attempt whose runner died (or lost its lease) mid-step, set by the takeover."""

STOPPING = "STOPPING"
"""List filter for RUNNING operations with a stop recorded (see Operation.is_stopping)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def request_hash(agent: str, input_value: JSONValue, labels: Mapping[str, str]) -> str:
    """Fingerprint of a start request, to tell a retried idempotent start from a conflicting one."""
    # Without labels the fingerprint is the one stored before labels existed (migration 0002).
    parts: list[Any] = [agent, input_value, dict(labels)] if labels else [agent, input_value]
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def deadline_at(
    created_at: datetime, deadline_seconds: float | None, to_db: Callable[[datetime], Any]
) -> Any:
    """The stored `deadline_at` of an operation created at `created_at` (None: no deadline)."""
    if deadline_seconds is None:
        return None
    return to_db(created_at + timedelta(seconds=deadline_seconds))


STOPPED_AHEAD_HOLD_SECONDS = 10.0
"""How long a start whose create finds a live stop by its key (a tombstone) is held at least. A
runner claims only unheld operations (claim_next, claim_and_start) and no work notification is
sent for a held one, so the hold keeps every runner off the operation until the start applies
the tombstone's stop (a round trip or two later): it is interrupted before it ever runs. If the
stop's write fails, or the process dies in between, the tombstone stays and a retry of the start
applies it; with no retry, the operation runs once the hold lapses, as an unheld one would have
at once: the hold only has to outlast a start that is alive. (The take is as of the create's
time, so a tombstone that expires in between is still taken.)"""


def stopped_ahead_hold(now: datetime, held_until: datetime | None) -> datetime:
    """The `held_until` of an operation created at `now` when its create finds a tombstone of
    its key: `held_until` (the start's own hold), made at least STOPPED_AHEAD_HOLD_SECONDS."""
    hold = now + timedelta(seconds=STOPPED_AHEAD_HOLD_SECONDS)
    return hold if held_until is None else max(held_until, hold)


def stop_data(requested_by: str, reason: str, cause: StopCause | None) -> dict[str, JSONValue]:
    """The `stop_requested` event's data."""
    data: dict[str, JSONValue] = {"requested_by": requested_by, "reason": reason}
    if cause is not None:
        data["cause"] = cause.value
    return data


def not_recorded(operation: Operation | None, owner: str) -> InterruptResult | None:
    """Why a stop's write recorded nothing: the operation was stopped or had finished already;
    None when there is no such operation (or, with `owner` set, it is someone else's: the same
    answer, so ids cannot be probed)."""
    if operation is None or (owner and operation.owner != owner):
        return None
    if operation.stop is not None:
        return InterruptResult(InterruptOutcome.ALREADY_REQUESTED, operation)
    return InterruptResult(InterruptOutcome.ALREADY_FINISHED, operation)


def halt_data(
    mid_step: bool, step: int, halted_ms: float, cause: StopCause | None
) -> dict[str, JSONValue]:
    """The `interrupted` event's data (PostgreSQL's halt statement builds the same in SQL)."""
    data: dict[str, JSONValue] = {"mid_step": mid_step, "step": step, "halt_ms": halted_ms}
    if cause is not None:
        data["cause"] = cause.value
    return data


def halt_ms(
    halted_at: datetime, stop_recorded_at: datetime | None, seen_at: datetime | None
) -> float:
    """Milliseconds from the committed stop to the halt, for the `interrupted` event.

    The stored stop time is taken just before the stop's write, so it comes early by however
    long that write waited and took to commit (under load, hundreds of milliseconds). `seen_at`,
    when known, is a time after the commit: taken by the replica that recorded the stop right
    after its commit, or by the runner when the stop's notification arrived. The later of the
    two is the closer to the commit. (PostgreSQL computes the same in its halt statement.)"""
    since = max((t for t in (stop_recorded_at, seen_at) if t is not None), default=None)
    if since is None:
        return 0.0
    return round(max(0.0, (halted_at - since).total_seconds() * 1000.0), 3)
