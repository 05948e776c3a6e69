"""Translation between domain values and stopline.v1 protobuf messages (and nothing else)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from runtime_service.domain import (
    AnswerOutcome,
    Event,
    EventKind,
    InterruptOutcome,
    Operation,
    OperationStatus,
    PauseOutcome,
    ResumeOutcome,
    StopCause,
)
from stopline.errors import InvalidArgument
from stopline.json_values import struct_to_python, value_to_python
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

_STATUS_TO_PB = {
    OperationStatus.PENDING: op_pb.OPERATION_STATUS_PENDING,
    OperationStatus.RUNNING: op_pb.OPERATION_STATUS_RUNNING,
    OperationStatus.COMPLETED: op_pb.OPERATION_STATUS_COMPLETED,
    OperationStatus.FAILED: op_pb.OPERATION_STATUS_FAILED,
    OperationStatus.INTERRUPTED: op_pb.OPERATION_STATUS_INTERRUPTED,
    OperationStatus.WAITING: op_pb.OPERATION_STATUS_WAITING,
    OperationStatus.PAUSED: op_pb.OPERATION_STATUS_PAUSED,
}
# List filter values as storage understands them; STOPPING is a reported-only status.
_FILTER_FROM_PB: dict[int, str | None] = {
    op_pb.OPERATION_STATUS_UNSPECIFIED: None,
    op_pb.OPERATION_STATUS_STOPPING: "STOPPING",
    **{pb: status.value for status, pb in _STATUS_TO_PB.items()},
}
_OUTCOME_TO_PB = {
    InterruptOutcome.ACCEPTED: rt_pb.INTERRUPT_OUTCOME_ACCEPTED,
    InterruptOutcome.ALREADY_REQUESTED: rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED,
    InterruptOutcome.ALREADY_FINISHED: rt_pb.INTERRUPT_OUTCOME_ALREADY_FINISHED,
    InterruptOutcome.SKIPPED_WATCHED: rt_pb.INTERRUPT_OUTCOME_SKIPPED_WATCHED,
    InterruptOutcome.RECORDED_AHEAD: rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD,
}


_CAUSE_TO_PB: dict[StopCause, op_pb.StopCause.ValueType] = {
    cause: op_pb.StopCause.Value(f"STOP_CAUSE_{cause.value}") for cause in StopCause
}
_CAUSE_FROM_PB: dict[op_pb.StopCause.ValueType, StopCause] = {
    pb: cause for cause, pb in _CAUSE_TO_PB.items()
}
# Events whose data carries a StopCause value.
_CAUSED = (EventKind.STOP_REQUESTED, EventKind.INTERRUPTED)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """As `Timestamp.FromDatetime` (a naive value is UTC), by one subtraction: that method is
    Python (a time tuple and calendar.timegm) and ran for every event sent to a watcher and four
    times for every operation answered, about 5 µs each."""
    since = value - (_NAIVE_EPOCH if value.tzinfo is None else _EPOCH)
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def status_filter(value: int) -> str | None:
    """Wire status -> storage list filter; unknown enum numbers raise KeyError."""
    return _FILTER_FROM_PB[value]


def reported_status(operation: Operation) -> op_pb.OperationStatus.ValueType:
    if operation.is_stopping:
        return op_pb.OPERATION_STATUS_STOPPING
    return _STATUS_TO_PB[operation.status]


def operation_to_pb(operation: Operation) -> op_pb.Operation:
    msg = op_pb.Operation(
        id=operation.id,
        agent=operation.agent,
        idempotency_key=operation.idempotency_key or "",
        status=reported_status(operation),
        steps_completed=operation.steps_completed,
        last_seq=operation.last_seq,
        error=operation.error or "",
        create_time=timestamp(operation.created_at),
        update_time=timestamp(operation.updated_at),
        owner=operation.owner,
    )
    msg.input.update(operation.input)
    msg.labels.update(operation.labels)
    msg.state.CopyFrom(json_to_value(operation.agent_state))
    if operation.status is OperationStatus.COMPLETED:
        json_format.ParseDict(operation.result, msg.result)
    if operation.stop is not None:
        msg.stop_request.CopyFrom(
            op_pb.StopRequest(
                requested_at=timestamp(operation.stop.requested_at),
                requested_by=operation.stop.requested_by,
                reason=operation.stop.reason,
                cause=cause_to_pb(operation.stop.cause),
            )
        )
    if operation.finished_at is not None:
        msg.finish_time.CopyFrom(timestamp(operation.finished_at))
    if operation.deadline_at is not None:
        msg.deadline_time.CopyFrom(timestamp(operation.deadline_at))
    msg.max_steps = operation.max_steps or 0
    msg.input_request_id = operation.input_request_id or ""
    msg.pause_requested = operation.pause_requested_at is not None
    return msg


# Event payloads whose fields are all scalars: built straight from the stored dict (replays
# convert every event, and json_format.ParseDict is pure Python and ten times slower).
_SCALAR_PAYLOADS: dict[EventKind, Any] = {
    EventKind.CREATED: op_pb.OperationCreated,
    EventKind.STARTED: op_pb.OperationStarted,
    EventKind.STEP_STARTED: op_pb.StepStarted,
    EventKind.OUTPUT_CHUNK: op_pb.OutputChunk,
    EventKind.STOP_REQUESTED: op_pb.StopRequested,
    EventKind.FAILED: op_pb.OperationFailed,
    EventKind.INTERRUPTED: op_pb.OperationInterrupted,
    EventKind.TEXT_DELTA: op_pb.TextDelta,
    EventKind.TOOL_CALL_FAILED: op_pb.ToolCallFailed,
    EventKind.TOOL_CALL_CANCELLED: op_pb.ToolCallCancelled,
    EventKind.TOOL_CALL_OUTCOME_UNKNOWN: op_pb.ToolCallOutcomeUnknown,
    EventKind.PAUSE_REQUESTED: op_pb.PauseRequested,
    EventKind.PAUSED: op_pb.OperationPaused,
}
# Payloads with one JSON value field (google.protobuf.Value): that field's name, the rest scalar.
_VALUE_PAYLOADS: dict[EventKind, tuple[Any, str]] = {
    EventKind.STEP_COMPLETED: (op_pb.StepCompleted, "output"),
    EventKind.COMPLETED: (op_pb.OperationCompleted, "result"),
    EventKind.TOOL_CALL_STARTED: (op_pb.ToolCallStarted, "arguments"),
    EventKind.TOOL_CALL_FINISHED: (op_pb.ToolCallFinished, "result"),
    EventKind.AGENT_EVENT: (op_pb.AgentEvent, "payload"),
}


def json_to_value(value: Any) -> struct_pb2.Value:
    """A JSON value (as json.loads gives it) as google.protobuf.Value."""
    msg = struct_pb2.Value()
    if value is None:
        msg.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        msg.bool_value = value
    elif isinstance(value, int | float):
        msg.number_value = value
    elif isinstance(value, str):
        msg.string_value = value
    elif isinstance(value, dict):
        msg.struct_value.SetInParent()  # {} is a value too: mark it present even when empty
        msg.struct_value.update(value)
    elif isinstance(value, list):
        msg.list_value.SetInParent()
        msg.list_value.extend(value)
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")
    return msg


def cause_to_pb(cause: StopCause | None) -> op_pb.StopCause.ValueType:
    return op_pb.STOP_CAUSE_UNSPECIFIED if cause is None else _CAUSE_TO_PB[cause]


def cause_from_pb(value: op_pb.StopCause.ValueType) -> StopCause:
    """The runtime's reading of a request's cause: UNSPECIFIED (or unknown) is an operator's."""
    return _CAUSE_FROM_PB.get(value, StopCause.OPERATOR)


def event_to_pb(event: Event) -> op_pb.Event:
    data = event.data
    if "cause" in data and event.kind in _CAUSED:
        data = {**data, "cause": _CAUSE_TO_PB[StopCause(data["cause"])]}
    payload_type = _SCALAR_PAYLOADS.get(event.kind)
    special = _SPECIAL_PAYLOADS.get(event.kind)
    if special is not None:
        payload = special(data)
    elif payload_type is not None:
        payload = payload_type(**data)
    else:
        message_type, value_field = _VALUE_PAYLOADS[event.kind]
        fields = {k: v for k, v in data.items() if k != value_field}
        payload = message_type(**fields, **{value_field: json_to_value(data.get(value_field))})
    return op_pb.Event(
        operation_id=event.operation_id,
        seq=event.seq,
        time=timestamp(event.created_at),
        **{event.kind.value: payload},
    )


# --- waiting for a person: answers as stored JSON (runtime_service/waiting.py) <-> protobuf ----

_KINDS_TO_PB = {"approval": op_pb.INPUT_KIND_APPROVAL, "answer": op_pb.INPUT_KIND_ANSWER}


def answer_to_pb(answer: dict[str, Any] | None) -> op_pb.InputAnswer:
    msg = op_pb.InputAnswer()
    if answer is None:
        return msg
    if "approved" in answer:
        msg.approval.approved = bool(answer["approved"])
        msg.approval.reason = str(answer.get("reason") or "")
        if isinstance(answer.get("arguments"), dict):
            msg.approval.arguments.update(answer["arguments"])
    else:
        msg.value.CopyFrom(json_to_value(answer.get("value")))
    return msg


def answer_from_pb(msg: op_pb.InputAnswer) -> dict[str, Any]:
    """A request's answer as stored; INVALID_ARGUMENT when it is missing or not JSON."""
    which = msg.WhichOneof("answer")
    if which is None:
        raise InvalidArgument("answer", "is required: an approval or a value")
    try:
        if which == "approval":
            approval = msg.approval
            answer: dict[str, Any] = {"approved": approval.approved, "reason": approval.reason}
            if approval.HasField("arguments"):
                answer["arguments"] = struct_to_python(approval.arguments)
            return answer
        return {"value": value_to_python(msg.value)}
    except ValueError as exc:
        raise InvalidArgument(f"answer.{which}", f"is not JSON: {exc}") from None


def _input_requested(data: dict[str, Any]) -> op_pb.InputRequested:
    msg = op_pb.InputRequested(
        step=data["step"],
        request_id=data["request_id"],
        kind=_KINDS_TO_PB.get(data.get("kind", ""), op_pb.INPUT_KIND_UNSPECIFIED),
        prompt=data.get("prompt", ""),
        call_id=data.get("call_id", ""),
        tool_name=data.get("tool_name", ""),
        default_answer=answer_to_pb(data.get("default_answer")),
    )
    if "arguments" in data:
        msg.arguments.CopyFrom(json_to_value(data["arguments"]))
    if "schema" in data:
        msg.schema.CopyFrom(json_to_value(data["schema"]))
    msg.expire_time.CopyFrom(timestamp(datetime.fromisoformat(data["expire_time"])))
    return msg


def _input_answered(data: dict[str, Any]) -> op_pb.InputAnswered:
    return op_pb.InputAnswered(
        step=data["step"],
        request_id=data["request_id"],
        answer_id=data.get("answer_id", ""),
        answer=answer_to_pb(data.get("answer")),
        answered_by=data.get("answered_by", ""),
        expired=bool(data.get("expired", False)),
    )


def _resumed(data: dict[str, Any]) -> op_pb.OperationResumed:
    return op_pb.OperationResumed(
        requested_by=data.get("requested_by", ""),
        status=_STATUS_TO_PB[OperationStatus(data["status"])],
    )


_SPECIAL_PAYLOADS: dict[EventKind, Any] = {
    EventKind.INPUT_REQUESTED: _input_requested,
    EventKind.INPUT_ANSWERED: _input_answered,
    EventKind.RESUMED: _resumed,
}


def answered_to_pb(data: dict[str, Any]) -> op_pb.InputAnswered:
    """An input_answered event's data (StoredRequest.resolution) as its message."""
    return _input_answered(data)


def answer_outcome_to_pb(outcome: AnswerOutcome) -> rt_pb.AnswerOutcome.ValueType:
    return rt_pb.AnswerOutcome.Value(f"ANSWER_OUTCOME_{outcome.value}")


def pause_outcome_to_pb(outcome: PauseOutcome) -> rt_pb.PauseOutcome.ValueType:
    return rt_pb.PauseOutcome.Value(f"PAUSE_OUTCOME_{outcome.value}")


def resume_outcome_to_pb(outcome: ResumeOutcome) -> rt_pb.ResumeOutcome.ValueType:
    return rt_pb.ResumeOutcome.Value(f"RESUME_OUTCOME_{outcome.value}")


def batched(
    events: Sequence[Event], max_events: int, max_bytes: int
) -> Iterator[list[op_pb.Event]]:
    """The events as protobuf, in consecutive groups of at most `max_events` and about
    `max_bytes` (an event larger than that travels alone)."""
    group: list[op_pb.Event] = []
    size = 0
    for event in events:
        msg = event_to_pb(event)
        msg_size = msg.ByteSize()
        if group and (len(group) >= max_events or size + msg_size > max_bytes):
            yield group
            group, size = [], 0
        group.append(msg)
        size += msg_size
    if group:
        yield group


def outcome_to_pb(outcome: InterruptOutcome) -> rt_pb.InterruptOutcome.ValueType:
    return _OUTCOME_TO_PB[outcome]
