"""Translation between domain values and stopline.v1 protobuf messages (and nothing else)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from runtime_service.domain import Event, InterruptOutcome, Operation, OperationStatus
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

_STATUS_TO_PB = {
    OperationStatus.PENDING: op_pb.OPERATION_STATUS_PENDING,
    OperationStatus.RUNNING: op_pb.OPERATION_STATUS_RUNNING,
    OperationStatus.COMPLETED: op_pb.OPERATION_STATUS_COMPLETED,
    OperationStatus.FAILED: op_pb.OPERATION_STATUS_FAILED,
    OperationStatus.INTERRUPTED: op_pb.OPERATION_STATUS_INTERRUPTED,
}
# List filter values as the store understands them; STOPPING is a reported-only status.
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
}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def status_filter(value: int) -> str | None:
    """Wire status -> store list filter; unknown enum numbers raise KeyError."""
    return _FILTER_FROM_PB[value]


def reported_status(operation: Operation) -> op_pb.OperationStatus.ValueType:
    if operation.is_stopping:
        return op_pb.OPERATION_STATUS_STOPPING
    return _STATUS_TO_PB[operation.status]


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


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
    if operation.status is OperationStatus.COMPLETED:
        json_format.ParseDict(operation.result, msg.result)
    if operation.stop is not None:
        msg.stop_request.CopyFrom(
            op_pb.StopRequest(
                requested_at=timestamp(operation.stop.requested_at),
                requested_by=operation.stop.requested_by,
                reason=operation.stop.reason,
            )
        )
    if operation.finished_at is not None:
        msg.finish_time.CopyFrom(timestamp(operation.finished_at))
    return msg


def event_to_pb(event: Event) -> op_pb.Event:
    msg = op_pb.Event(
        operation_id=event.operation_id, seq=event.seq, time=timestamp(event.created_at)
    )
    json_format.ParseDict(event.data, getattr(msg, event.kind.value))
    return msg


def outcome_to_pb(outcome: InterruptOutcome) -> rt_pb.InterruptOutcome.ValueType:
    return _OUTCOME_TO_PB[outcome]
