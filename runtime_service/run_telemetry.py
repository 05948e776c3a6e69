"""What a run of an operation tells operators: its spans (the run, each step) and the lines it
logs when it ends, for the runner (runner/), which decides when.

The run's span is a child of the start request's span, whose W3C traceparent is stored with the
operation: however long after the start, on whichever replica, a run belongs to the start's
trace. Each step's span is a child of the run's, and the step's own spans (model requests, tool
calls) are children of the step's, since the step's task runs in the step span's context.
A stop delivered by a call on this replica links that call's span to the span it cut.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

from runtime_service.domain import Event, EventKind, Operation
from stopline import logs, tracing

log = logging.getLogger(__name__)

STEP_OUTCOME = "stopline.step.outcome"
"""How a step's span ended: returned (a next step follows), done, failed, stopped."""
STOPPED_STEP = {"stopline.link": "stopped_step"}
STOPPED_BY = {"stopline.link": "stopped_by"}


def operation_span(operation: Operation, agent: str) -> trace.Span:
    """This run of the operation: a child of the start request's span."""
    return tracing.tracer().start_span(
        "operation",
        context=tracing.context_from_traceparent(operation.trace_parent),
        attributes={
            "stopline.operation_id": operation.id,
            "stopline.agent": agent,
            "stopline.step": operation.steps_completed,
        },
    )


def step_span(operation_id: str, agent: str, step: int) -> trace.Span:
    """A child of the run's span (current in the run's task); a light span, made per step
    (`tracing.child_span`); with tracing off, the no-op span, for no work per step."""
    if not tracing.enabled():
        return trace.INVALID_SPAN
    return tracing.child_span(
        "step",
        {"stopline.operation_id": operation_id, "stopline.agent": agent, "stopline.step": step},
    )


def stop_received(cut: trace.Span, cause: str) -> None:
    """The stop reached the run while `cut` (a step's span, or the run's between steps) was
    in flight."""
    if cut.is_recording():
        cut.add_event("stop received", {"stopline.stop_cause": cause})


def link_stop(cut: trace.Span | None) -> None:
    """A stop delivered by a call on this replica (the InterruptOperation that recorded it):
    the call's span links to the span the stop cut and, while that one is still open, it links
    back. A stop heard by notification from another replica, or found by the periodic re-read,
    has no call here: the cut span only notes it (`stop_received`)."""
    caller = trace.get_current_span()
    if cut is None or getattr(caller, "kind", None) is not trace.SpanKind.SERVER:
        return
    context = caller.get_span_context()
    if not context.is_valid or not cut.get_span_context().is_valid:
        return
    caller.add_link(cut.get_span_context(), STOPPED_STEP)
    if cut.is_recording():
        cut.add_link(context, STOPPED_BY)


def finished(event: Event, cause: str, run_span: trace.Span | None) -> None:
    """The terminal event of an operation committed: its line, and its run span's status."""
    data = event.data if isinstance(event.data, dict) else {}
    facts: dict[str, Any] = {"operation_id": event.operation_id, "status": event.kind.value}
    if event.kind is EventKind.INTERRUPTED:
        facts["cause"] = cause
        for key in ("halt_ms", "mid_step"):
            if key in data:
                facts[key] = data[key]
    if run_span is not None and run_span.is_recording():
        run_span.set_attribute("stopline.status", event.kind.value)
        if "cause" in facts:
            run_span.set_attribute("stopline.stop_cause", cause)
        if event.kind is EventKind.FAILED:
            run_span.set_status(trace.StatusCode.ERROR, "the operation failed")
    log.info("operation finished", extra=logs.fields(**facts))
