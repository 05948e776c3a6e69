"""gRPC servicer for stopline.v1.RuntimeService: validate the wire shape, translate, delegate."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from google.protobuf import duration_pb2
from grpc import aio

from runtime_service import convert
from runtime_service.domain import RecordedAhead
from runtime_service.operations import OperationsService
from runtime_service.starts import StartArgs
from runtime_service.storage import Created
from stopline.errors import InvalidArgument
from stopline.grpc_status import server_stream, unary
from stopline.limits import struct_to_input
from stopline.transport import REPLICA_METADATA
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb
from stopline.v1 import runtime_service_pb2_grpc as pb_grpc

# A batched watch response stays well under the default 4 MiB receive limit of gRPC clients.
MAX_BATCH_EVENTS = 256
MAX_BATCH_BYTES = 1024 * 1024


class RuntimeServicer(pb_grpc.RuntimeServiceServicer):
    def __init__(self, operations: OperationsService, advertise_address: str | None = None) -> None:
        self._ops = operations
        # Sent where the operation runs here, so that the gateway calls this replica itself.
        self._named = ((REPLICA_METADATA, advertise_address),) if advertise_address else None

    @unary
    async def StartOperation(
        self,
        request: pb.StartOperationRequest,
        context: aio.ServicerContext[pb.StartOperationRequest, pb.StartOperationResponse],
    ) -> pb.StartOperationResponse:
        return await self._start(request)

    async def _start(self, request: pb.StartOperationRequest) -> pb.StartOperationResponse:
        return _started(await self._ops.start_with(_start_args(request)))

    @server_stream
    async def StartAndWatchOperation(
        self,
        request: pb.StartAndWatchOperationRequest,
        context: aio.ServicerContext[
            pb.StartAndWatchOperationRequest, pb.StartAndWatchOperationResponse
        ],
    ) -> AsyncGenerator[pb.StartAndWatchOperationResponse, None]:
        """A start, and its watch from seq 1 on the same stream (see
        OperationsService.start_and_watch)."""
        stream = self._ops.start_and_watch(_start_args(request.start))
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, Created):
                    if self._named is not None:
                        # Whoever releases it here runs it here (a held start's release claims
                        # it where its runner has room), as does a start that is not held.
                        await context.send_initial_metadata(self._named)
                    yield pb.StartAndWatchOperationResponse(started=_started(item))
                    continue
                for part in convert.batched(item, MAX_BATCH_EVENTS, MAX_BATCH_BYTES):
                    yield pb.StartAndWatchOperationResponse(events=part)

    @unary
    async def GetOperation(
        self,
        request: pb.GetOperationRequest,
        context: aio.ServicerContext[pb.GetOperationRequest, pb.GetOperationResponse],
    ) -> pb.GetOperationResponse:
        operation = await self._ops.get(request.operation_id)
        return pb.GetOperationResponse(operation=convert.operation_to_pb(operation))

    @unary
    async def ListOperations(
        self,
        request: pb.ListOperationsRequest,
        context: aio.ServicerContext[pb.ListOperationsRequest, pb.ListOperationsResponse],
    ) -> pb.ListOperationsResponse:
        status = _status_filter(request.status)
        page, token = await self._ops.list(
            status, request.page_size, request.page_token, request.owner
        )
        return pb.ListOperationsResponse(
            operations=[convert.operation_to_pb(o) for o in page], next_page_token=token
        )

    @unary
    async def InterruptOperation(
        self,
        request: pb.InterruptOperationRequest,
        context: aio.ServicerContext[pb.InterruptOperationRequest, pb.InterruptOperationResponse],
    ) -> pb.InterruptOperationResponse:
        if request.idempotency_key:
            if request.operation_id:
                raise InvalidArgument(
                    "operation_id", "set exactly one of operation_id and idempotency_key"
                )
            if request.only_if_unwatched:
                raise InvalidArgument(
                    "only_if_unwatched", "applies to a stop by operation_id, not by key"
                )
            by_key = await self._ops.interrupt_by_key(
                request.idempotency_key,
                request.owner,
                request.requested_by,
                request.reason,
                convert.cause_from_pb(request.cause),
            )
            if isinstance(by_key, RecordedAhead):
                return pb.InterruptOperationResponse(outcome=convert.outcome_to_pb(by_key.outcome))
            result = by_key
        else:
            result = await self._ops.interrupt(
                request.operation_id,
                request.requested_by,
                request.reason,
                request.only_if_unwatched,
                convert.cause_from_pb(request.cause),
                request.owner,
            )
        return pb.InterruptOperationResponse(
            outcome=convert.outcome_to_pb(result.outcome),
            operation=convert.operation_to_pb(result.operation),
        )

    @unary
    async def StopOperations(
        self,
        request: pb.StopOperationsRequest,
        context: aio.ServicerContext[pb.StopOperationsRequest, pb.StopOperationsResponse],
    ) -> pb.StopOperationsResponse:
        status = _status_filter(request.status)
        done = await self._ops.stop_matching(
            request.owner, status, request.agent, dict(request.labels)
        )
        return pb.StopOperationsResponse(
            stopped=len(done.operation_ids),
            operation_ids=done.operation_ids,
            limit_reached=done.limit_reached,
        )

    @server_stream
    async def WatchOperation(
        self,
        request: pb.WatchOperationRequest,
        context: aio.ServicerContext[pb.WatchOperationRequest, pb.WatchOperationResponse],
    ) -> AsyncGenerator[pb.WatchOperationResponse, None]:
        if self._named is not None and self._ops.runs_here(request.operation_id):
            await context.send_initial_metadata(self._named)
        if not request.batch:
            events = self._ops.watch(request.operation_id, request.after_seq)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield pb.WatchOperationResponse(event=convert.event_to_pb(event))
            return
        async for part in self._batches(request.operation_id, request.after_seq):
            yield pb.WatchOperationResponse(events=part)

    async def _batches(
        self, operation_id: str, after_seq: int
    ) -> AsyncGenerator[list[op_pb.Event], None]:
        """The operation's events after `after_seq` as batched watches send them: each batch
        holds the events that were ready together, cut to stay under the message limits."""
        batches = self._ops.watch_batches(operation_id, after_seq)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for part in convert.batched(batch, MAX_BATCH_EVENTS, MAX_BATCH_BYTES):
                    yield part

    @unary
    async def ReleaseOperation(
        self,
        request: pb.ReleaseOperationRequest,
        context: aio.ServicerContext[pb.ReleaseOperationRequest, pb.ReleaseOperationResponse],
    ) -> pb.ReleaseOperationResponse:
        operation = await self._ops.release(request.operation_id)
        return pb.ReleaseOperationResponse(operation=convert.operation_to_pb(operation))

    @unary
    async def AnswerInput(
        self,
        request: pb.AnswerInputRequest,
        context: aio.ServicerContext[pb.AnswerInputRequest, pb.AnswerInputResponse],
    ) -> pb.AnswerInputResponse:
        outcome, result = await self._ops.answer(
            request.operation_id,
            request.request_id,
            request.answer_id,
            convert.answer_from_pb(request.answer),
            request.answered_by,
            request.owner,
        )
        return pb.AnswerInputResponse(
            outcome=convert.answer_outcome_to_pb(outcome),
            operation=convert.operation_to_pb(result.operation),
            answered=convert.answered_to_pb(result.request.resolution),
        )

    @unary
    async def PauseOperation(
        self,
        request: pb.PauseOperationRequest,
        context: aio.ServicerContext[pb.PauseOperationRequest, pb.PauseOperationResponse],
    ) -> pb.PauseOperationResponse:
        result = await self._ops.pause(request.operation_id, request.requested_by, request.owner)
        return pb.PauseOperationResponse(
            outcome=convert.pause_outcome_to_pb(result.outcome),
            operation=convert.operation_to_pb(result.operation),
        )

    @unary
    async def ResumeOperation(
        self,
        request: pb.ResumeOperationRequest,
        context: aio.ServicerContext[pb.ResumeOperationRequest, pb.ResumeOperationResponse],
    ) -> pb.ResumeOperationResponse:
        result = await self._ops.resume(request.operation_id, request.requested_by, request.owner)
        return pb.ResumeOperationResponse(
            outcome=convert.resume_outcome_to_pb(result.outcome),
            operation=convert.operation_to_pb(result.operation),
        )


def _status_filter(value: int) -> str | None:
    """A request's `status` filter as the use cases take it; INVALID_ARGUMENT for an unknown
    enum value (ListOperations and StopOperations)."""
    try:
        return convert.status_filter(value)
    except KeyError:
        raise InvalidArgument("status", f"unknown OperationStatus value {value}") from None


def _seconds(duration: duration_pb2.Duration) -> float:
    # Plain arithmetic, not ToTimedelta: a hostile Duration overflows timedelta (INTERNAL).
    return duration.seconds + duration.nanos / 1e9


def _start_args(request: pb.StartOperationRequest) -> StartArgs:
    return StartArgs(
        request.agent,
        struct_to_input(request.input),
        request.idempotency_key,
        dict(request.labels),
        _seconds(request.hold) if request.HasField("hold") else 0.0,
        request.owner,
        _seconds(request.deadline) if request.HasField("deadline") else None,
        request.max_steps,
        request.key_private,
    )


def _started(created: Created) -> pb.StartOperationResponse:
    return pb.StartOperationResponse(
        operation=convert.operation_to_pb(created.operation), created=created.created
    )
