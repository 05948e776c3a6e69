"""The stops the runtime itself requests, and how each is recorded: one function per cause.

They go through the same stop write as a user's stop (storage.record_stop), so they are visible
the same way (STOPPING, then a stop_requested and an interrupted event). Until stops carry a
cause of their own, the cause is told by `requested_by` ("runtime") and the reason text; these
functions are the one place that text is made.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNTIME = "runtime"
"""`requested_by` of every stop the runtime requests itself."""


@dataclass(frozen=True, slots=True)
class RuntimeStop:
    requested_by: str
    reason: str
    category: str
    """The stop's cause as a metrics label (runtime_service/metrics.py)."""


# A stop's cause as a metrics label (runtime_service/metrics.py), until stops carry a cause.
DEADLINE = "deadline"
STEP_BUDGET = "step_budget"
BULK = "bulk"
USER = "user"
CLIENT_GONE = "client_gone"
GRACE_EXPIRED = "grace_expired"

GATEWAY_POLICY = "gateway"
"""`requested_by` of the gateway's cancel-policy stops (gateway_service/core.py GATEWAY); a user's
stop through the gateway is recorded as "<principal> (client <peer>)", never as this alone."""


def category(requested_by: str, only_if_unwatched: bool) -> str:
    """The metrics' cause label of a stop asked for over InterruptOperation, derived from what
    the stop carries until stops have a cause of their own: a grace policy's stop (the only one
    sent only-if-unwatched), a cancel policy's stop when the client left, or a user's."""
    if only_if_unwatched:
        return GRACE_EXPIRED
    if requested_by == GATEWAY_POLICY:
        return CLIENT_GONE
    return USER


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000.0, 3):g} ms"


def deadline_exceeded(deadline_seconds: float) -> RuntimeStop:
    """The operation's deadline (wall time from its start) passed."""
    return RuntimeStop(RUNTIME, f"deadline of {_ms(deadline_seconds)} exceeded", DEADLINE)


def step_budget_exhausted(max_steps: int) -> RuntimeStop:
    """The operation completed the most steps it may run and was not done."""
    unit = "step" if max_steps == 1 else "steps"
    return RuntimeStop(RUNTIME, f"step budget of {max_steps} {unit} exhausted", STEP_BUDGET)


def bulk_stop() -> RuntimeStop:
    """Stopped by a StopOperations call matching it."""
    return RuntimeStop(RUNTIME, "bulk stop", BULK)
