"""gRPC servicer for stopline.gateway.v1.GatewayService: validate, translate, delegate."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from grpc import aio

from gateway_service.core import Accepted, Gateway, Limits
from gateway_service.policies import CLIENT_CANCELLED, CLIENT_DEADLINE, CancelPolicy
from gateway_service.streams import EventItem, StopRequestedItem, StopUndeliveredItem, StreamItem
from stopline.caller import current_principal
from stopline.errors import InvalidArgument
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.grpc_status import server_stream, unary
from stopline.limits import MAX_REQUESTED_BY
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

_POLICIES = {
    pb.CANCEL_POLICY_UNSPECIFIED: CancelPolicy.STOP,
    pb.CANCEL_POLICY_STOP: CancelPolicy.STOP,
    pb.CANCEL_POLICY_KEEP_RUNNING: CancelPolicy.KEEP_RUNNING,
    pb.CANCEL_POLICY_STOP_AFTER_GRACE: CancelPolicy.STOP_AFTER_GRACE,
}


def _notice_fields(
    item: StreamItem,
) -> dict[str, op_pb.Event | pb.StopNotice | pb.StopUndelivered]:
    if isinstance(item, EventItem):
        return {"event": item.event}
    if isinstance(item, StopRequestedItem):
        return {"stop_requested": pb.StopNotice(requested_by=item.requested_by, reason=item.reason)}
    assert isinstance(item, StopUndeliveredItem)
    return {"stop_undelivered": pb.StopUndelivered(reason=item.reason, attempts=item.attempts)}


def _caller(context: aio.ServicerContext[Any, Any]) -> str:
    """Recorded with a stop: the authenticated principal, and where the call came from. Cut to
    the runtime's limit (MAX_REQUESTED_BY), so a long principal cannot make its own stops
    invalid."""
    return f"{current_principal()} (client {context.peer()})"[:MAX_REQUESTED_BY]


def _why_gone(context: aio.ServicerContext[Any, Any]) -> Callable[[], str]:
    """Asked when a stream's client has gone: was it its deadline (which gRPC reports to the
    server as a cancelled call) or a cancel / broken connection? Both trigger the cancel policy;
    the stop's reason says which."""

    def why() -> str:
        remaining = context.time_remaining()
        # A small margin for timer granularity: the call is cancelled when its deadline timer fires.
        return CLIENT_DEADLINE if remaining is not None and remaining <= 0.05 else CLIENT_CANCELLED

    return why


def _stream_key(context: aio.ServicerContext[Any, Any]) -> str:
    """Whose stream slot a call takes: the authenticated principal's."""
    return current_principal()


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    @server_stream
    async def StartAndStream(
        self,
        request: pb.StartAndStreamRequest,
        context: aio.ServicerContext[pb.StartAndStreamRequest, pb.StartAndStreamResponse],
    ) -> AsyncGenerator[pb.StartAndStreamResponse, None]:
        policy = _POLICIES.get(request.cancel_policy)
        if policy is None:
            raise InvalidArgument("cancel_policy", f"unknown value {request.cancel_policy}")
        # Plain arithmetic, not ToTimedelta: a hostile Duration overflows timedelta (INTERNAL).
        grace = (
            request.cancel_grace.seconds + request.cancel_grace.nanos / 1e9
            if request.HasField("cancel_grace")
            else None
        )
        updates = self._gw.start_and_stream(
            request.agent,
            request.input,
            request.idempotency_key,
            policy,
            self._gw.check_grace(policy, grace),
            current_principal(),
            _why_gone(context),
            limits=Limits(
                request.deadline if request.HasField("deadline") else None, request.max_steps
            ),
            hold=not request.no_hold,
        )
        with self._gw.stream_slots.acquire(_stream_key(context)):
            async with contextlib.aclosing(updates):
                async for update in updates:
                    if isinstance(update, Accepted):
                        accepted = pb.OperationAccepted(
                            operation_id=update.operation.id, operation=update.operation
                        )
                        yield pb.StartAndStreamResponse(accepted=accepted)
                    else:
                        yield pb.StartAndStreamResponse(**_notice_fields(update))  # type: ignore[arg-type]

    @server_stream
    async def StreamOperation(
        self,
        request: pb.StreamOperationRequest,
        context: aio.ServicerContext[pb.StreamOperationRequest, pb.StreamOperationResponse],
    ) -> AsyncGenerator[pb.StreamOperationResponse, None]:
        items = self._gw.stream(
            request.operation_id, request.after_seq, current_principal(), _why_gone(context)
        )
        with self._gw.stream_slots.acquire(_stream_key(context)):
            async with contextlib.aclosing(items):
                async for item in items:
                    yield pb.StreamOperationResponse(**_notice_fields(item))  # type: ignore[arg-type]

    @unary
    async def StopOperation(
        self,
        request: pb.StopOperationRequest,
        context: aio.ServicerContext[pb.StopOperationRequest, pb.StopOperationResponse],
    ) -> pb.StopOperationResponse:
        answer = await self._gw.stop(
            request.operation_id,
            _caller(context),
            request.reason,
            current_principal(),
            request.idempotency_key,
        )
        if not answer.delivered or answer.response is None:
            return pb.StopOperationResponse(delivery=pb.STOP_DELIVERY_PENDING)
        response = pb.StopOperationResponse(
            delivery=pb.STOP_DELIVERY_DELIVERED, outcome=answer.response.outcome
        )
        if answer.response.HasField("operation"):  # none when recorded ahead of the start
            response.operation.CopyFrom(answer.response.operation)
        return response

    @unary
    async def StopOperations(
        self,
        request: pb.StopOperationsRequest,
        context: aio.ServicerContext[pb.StopOperationsRequest, pb.StopOperationsResponse],
    ) -> pb.StopOperationsResponse:
        done = await self._gw.stop_matching(
            rt_pb.StopOperationsRequest(
                status=request.status, agent=request.agent, labels=dict(request.labels)
            ),
            current_principal(),
        )
        return pb.StopOperationsResponse(
            stopped=done.stopped,
            operation_ids=done.operation_ids,
            limit_reached=done.limit_reached,
        )

    @unary
    async def GetOperation(
        self,
        request: pb.GetOperationRequest,
        context: aio.ServicerContext[pb.GetOperationRequest, pb.GetOperationResponse],
    ) -> pb.GetOperationResponse:
        operation = await self._gw.get(request.operation_id, current_principal())
        return pb.GetOperationResponse(operation=operation)

    @unary
    async def ListOperations(
        self,
        request: pb.ListOperationsRequest,
        context: aio.ServicerContext[pb.ListOperationsRequest, pb.ListOperationsResponse],
    ) -> pb.ListOperationsResponse:
        page = await self._gw.list(
            rt_pb.ListOperationsRequest(
                status=request.status, page_size=request.page_size, page_token=request.page_token
            ),
            current_principal(),
        )
        return pb.ListOperationsResponse(
            operations=page.operations, next_page_token=page.next_page_token
        )

    @unary
    async def AnswerInput(
        self,
        request: pb.AnswerInputRequest,
        context: aio.ServicerContext[pb.AnswerInputRequest, pb.AnswerInputResponse],
    ) -> pb.AnswerInputResponse:
        answered = await self._gw.answer(
            rt_pb.AnswerInputRequest(
                operation_id=request.operation_id,
                request_id=request.request_id,
                answer_id=request.answer_id,
                answer=request.answer,
                answered_by=current_principal()[:MAX_REQUESTED_BY],
            ),
            current_principal(),
        )
        return pb.AnswerInputResponse(
            outcome=answered.outcome, operation=answered.operation, answered=answered.answered
        )

    @unary
    async def PauseOperation(
        self,
        request: pb.PauseOperationRequest,
        context: aio.ServicerContext[pb.PauseOperationRequest, pb.PauseOperationResponse],
    ) -> pb.PauseOperationResponse:
        paused = await self._gw.pause(request.operation_id, _caller(context), current_principal())
        return pb.PauseOperationResponse(outcome=paused.outcome, operation=paused.operation)

    @unary
    async def ResumeOperation(
        self,
        request: pb.ResumeOperationRequest,
        context: aio.ServicerContext[pb.ResumeOperationRequest, pb.ResumeOperationResponse],
    ) -> pb.ResumeOperationResponse:
        resumed = await self._gw.resume(request.operation_id, _caller(context), current_principal())
        return pb.ResumeOperationResponse(outcome=resumed.outcome, operation=resumed.operation)
