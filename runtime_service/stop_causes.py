"""The stops the runtime itself requests, and how each is recorded: one function per cause.

They go through the same stop write as a user's stop (storage.record_stop), so they are visible
the same way (STOPPING, then a stop_requested and an interrupted event), with their StopCause;
these functions are the one place their `requested_by`, reason text and cause are made.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime_service.domain import StopCause

RUNTIME = "runtime"
"""`requested_by` of every stop the runtime requests itself."""


@dataclass(frozen=True, slots=True)
class RuntimeStop:
    requested_by: str
    reason: str
    cause: StopCause


CAUSE_UNKNOWN = "unknown"
"""The metrics label of a stop whose cause is not known (one recorded before causes existed)."""


def label(cause: StopCause | str | None) -> str:
    """A stop's cause as a metrics label (runtime_service/metrics.py): `user`, `client_gone`,
    `deadline_exceeded`, ...; `unknown` without one."""
    if cause is None:
        return CAUSE_UNKNOWN
    try:
        return StopCause(cause).value.lower()
    except ValueError:
        return CAUSE_UNKNOWN


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000.0, 3):g} ms"


def deadline_exceeded(deadline_seconds: float) -> RuntimeStop:
    """The operation's deadline (wall time from its start) passed."""
    return RuntimeStop(
        RUNTIME, f"deadline of {_ms(deadline_seconds)} exceeded", StopCause.DEADLINE_EXCEEDED
    )


def step_budget_exhausted(max_steps: int) -> RuntimeStop:
    """The operation completed the most steps it may run and was not done."""
    unit = "step" if max_steps == 1 else "steps"
    return RuntimeStop(
        RUNTIME, f"step budget of {max_steps} {unit} exhausted", StopCause.STEP_BUDGET
    )


def bulk_stop() -> RuntimeStop:
    """Stopped by a StopOperations call matching it."""
    return RuntimeStop(RUNTIME, "bulk stop", StopCause.BULK)
