"""Human-readable and JSON renderings of operations and events for the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC
from typing import Any

import click

from stopline.events import EventKind
from stopline.json_values import message_to_python, value_to_python
from stopline.v1 import operation_pb2 as op_pb

json_flag = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output, one JSON object per line."
)
"""Every command that prints operations or events: the JSON rendering instead of the readable
one (both commands' families, the gateway's `stopline ...` and `stopline runtime ...`)."""

# How a command that followed an operation to its end exits, by how it ended.
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # what shells report for a process ended by SIGINT
EXIT_BY_TERMINAL_EVENT: dict[str, int] = {
    EventKind.COMPLETED: 0,
    EventKind.FAILED: EXIT_FAILED,
    EventKind.INTERRUPTED: EXIT_INTERRUPTED,
}
# How the listing commands' --limit defaults (a page size the caller asks for).
LIST_LIMIT = 20


def status_name(value: int) -> str:
    return op_pb.OperationStatus.Name(value).removeprefix("OPERATION_STATUS_")  # type: ignore[arg-type]


# The statuses a listing can be filtered by, as typed on the command line (`--status running`).
STATUS_FILTERS = [status_name(v).lower() for v in op_pb.OperationStatus.values() if v]


def status_value(name: str) -> op_pb.OperationStatus.ValueType:
    """A status filter from the command line as its wire value; UNSPECIFIED (every status) for
    none."""
    if not name:
        return op_pb.OPERATION_STATUS_UNSPECIFIED
    return op_pb.OperationStatus.Value(f"OPERATION_STATUS_{name.upper()}")


def to_json(message: Any) -> str:
    """protobuf's JSON mapping, with integral numbers as integers (`1`, not `1.0`)."""
    return json.dumps(message_to_python(message, preserving_proto_field_name=True))


def describe_event(event: op_pb.Event) -> str:
    kind = event.WhichOneof("kind")
    prefix = f"[{event.seq:>4}] "
    if kind == "created":
        return prefix + f"created (agent {event.created.agent})"
    if kind == "started":
        s = event.started
        return prefix + (f"resumed at step {s.from_step}" if s.resumed else "started")
    if kind == "step_started":
        s2 = event.step_started
        attempt = f" (attempt {s2.attempt})" if s2.attempt > 1 else ""
        return prefix + f"step {s2.step} started{attempt}"
    if kind == "output_chunk":
        return prefix + f"  {event.output_chunk.text}"
    if kind == "step_completed":
        return prefix + f"step {event.step_completed.step} completed"
    if kind == "stop_requested":
        who = event.stop_requested.requested_by or "someone"
        return prefix + f"stop requested by {who}" + _cause(event.stop_requested.cause, ", cause ")
    if kind == "completed":
        result = json.dumps(value_to_python(event.completed.result))
        return prefix + f"COMPLETED: {result}"
    if kind == "failed":
        return prefix + f"FAILED at step {event.failed.step}: {event.failed.error}"
    if kind == "interrupted":
        i = event.interrupted
        where = f"mid-step {i.step}" if i.mid_step else f"before step {i.step}"
        halted = f"INTERRUPTED {where}, halted {i.halt_ms:.1f} ms after the stop"
        return prefix + halted + _cause(i.cause, "; cause ")
    structured = _describe_structured(event, kind)
    if structured is not None:
        return prefix + structured
    return prefix + kind if kind else prefix + "(unknown event)"


def _compact(value: Any, limit: int = 200) -> str:
    """A JSON value on one line, keys sorted (a Struct's keys have no order), cut to `limit`
    characters (the --json output is exact)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_structured(event: op_pb.Event, kind: str | None) -> str | None:
    """The agent's structured events (issue 13), or None for another kind."""
    if kind == "text_delta":
        return f"  {event.text_delta.text}"
    if kind == "tool_call_started":
        c = event.tool_call_started
        args = _compact(value_to_python(c.arguments))
        return f"tool call {c.call_id}: {c.name}({args})"
    if kind == "tool_call_finished":
        f = event.tool_call_finished
        return f"tool call {f.call_id} finished: {_compact(value_to_python(f.result))}"
    if kind == "tool_call_failed":
        return f"tool call {event.tool_call_failed.call_id} FAILED: {event.tool_call_failed.error}"
    if kind == "tool_call_cancelled":
        c2 = event.tool_call_cancelled
        return f"tool call {c2.call_id} cancelled: {c2.reason}"
    if kind == "tool_call_outcome_unknown":
        u = event.tool_call_outcome_unknown
        return f"tool call {u.call_id} outcome unknown: {u.reason}"
    if kind == "agent_event":
        a = event.agent_event
        return f"{a.kind}: {_compact(value_to_python(a.payload))}"
    return _describe_waiting(event, kind)


def describe_answer(answer: op_pb.InputAnswer) -> str:
    """An answer (or a request's default) in a person's words."""
    which = answer.WhichOneof("answer")
    if which == "approval":
        a = answer.approval
        if not a.approved:
            return f"rejected ({a.reason})" if a.reason else "rejected"
        if a.HasField("arguments"):
            return f"approved with arguments {_compact(message_to_python(a.arguments))}"
        return "approved"
    if which == "value":
        return f"answered {_compact(value_to_python(answer.value))}"
    return "no answer"


def _describe_waiting(event: op_pb.Event, kind: str | None) -> str | None:
    """Waiting for a person (issue 15), or None for another kind."""
    if kind == "input_requested":
        r = event.input_requested
        expires = r.expire_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
        what = f"approve {r.tool_name}({_compact(value_to_python(r.arguments))})"
        if r.kind != op_pb.INPUT_KIND_APPROVAL:
            what = f"answer: {r.prompt}"
        return (
            f"WAITING for a person: {what} [request {r.request_id}; expires {expires}, "
            f"then {describe_answer(r.default_answer)}]"
        )
    if kind == "input_answered":
        a = event.input_answered
        if a.expired:
            return f"request {a.request_id} expired: {describe_answer(a.answer)} by default"
        who = a.answered_by or "someone"
        return f"request {a.request_id} {describe_answer(a.answer)} by {who}"
    if kind == "pause_requested":
        return f"pause requested by {event.pause_requested.requested_by or 'someone'}"
    if kind == "paused":
        p = event.paused
        where = f"mid-step {p.step}" if p.mid_step else f"before step {p.step}"
        return f"PAUSED {where} by {p.requested_by or 'someone'}"
    if kind == "resumed":
        r2 = event.resumed
        return f"resumed by {r2.requested_by or 'someone'} ({status_name(r2.status)})"
    return None


class EventLines:
    """The human rendering of a stream as it arrives: one line per event, except that a run of
    text_delta events of one step continues one line, so a model's answer reads as text rather
    than as one line per flush. `write` gets raw text (it adds no newline) and should flush.
    (`--json` prints every event exactly, one per line, and does not use this.)"""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._text_step: int | None = None  # the step whose text line is open

    def event(self, event: op_pb.Event) -> None:
        if event.WhichOneof("kind") == "text_delta":
            delta = event.text_delta
            if self._text_step == delta.step:
                self._write(delta.text)
                return
            self.end_line()
            self._write(describe_event(event))
            self._text_step = delta.step
            return
        self.line(describe_event(event))

    def line(self, text: str) -> None:
        """A line of its own (a notice, a remark): ends an open text line first."""
        self.end_line()
        self._write(text + "\n")

    def end_line(self) -> None:
        if self._text_step is not None:
            self._text_step = None
            self._write("\n")


def cause_name(cause: op_pb.StopCause.ValueType) -> str:
    """A stop cause as people read it: `user`, `client_gone`, ... (empty when unspecified)."""
    if cause == op_pb.STOP_CAUSE_UNSPECIFIED:
        return ""
    return op_pb.StopCause.Name(cause).removeprefix("STOP_CAUSE_").lower()


def _cause(cause: op_pb.StopCause.ValueType, lead: str) -> str:
    name = cause_name(cause)
    return f"{lead}{name}" if name else ""


def describe_operation(operation: op_pb.Operation) -> str:
    line = (
        f"{operation.id}  {status_name(operation.status):<11}  {operation.agent:<10}  "
        f"steps={operation.steps_completed}  events={operation.last_seq}"
    )
    if operation.HasField("deadline_time"):
        deadline = operation.deadline_time.ToDatetime(tzinfo=UTC)
        line += f"  deadline={deadline.isoformat(timespec='seconds')}"
    if operation.max_steps:
        line += f"  max_steps={operation.max_steps}"
    if operation.HasField("stop_request"):
        line += _cause(operation.stop_request.cause, "  stop=")
    if operation.error:
        line += f"  error={operation.error!r}"
    if operation.status == op_pb.OPERATION_STATUS_WAITING and operation.input_request_id:
        line += f"  request={operation.input_request_id}"
    if operation.pause_requested:
        line += "  pause_requested"
    return line
