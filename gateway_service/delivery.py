"""At-least-once delivery of stops to the runtime.

A stop is accepted at once and then sent to the runtime, retried with exponential backoff and
jitter while the runtime is unreachable, until a deadline. InterruptOperation is idempotent, so a
retry after a lost answer is harmless. Any runtime replica can record a stop, so an attempt does
not wait on one that does not answer: without an answer after `hedge_delay` it sends the stop
again as a new call (which round_robin gives to the next replica), up to `max_calls` calls at
once, and takes the first answer. A delivery that runs out of time is reported (to every
local stream of the operation, and in the log), never dropped silently. Deliveries live in this
gateway process: one that dies mid-delivery loses its retries (the client sees no terminal event
and can stop again through another gateway).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import trace
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay

from gateway_service.metrics import GatewayMetrics
from gateway_service.runtime_link import RuntimeLink, backoff, is_retryable
from stopline import logs, tracing
from stopline.grpc_status import UpstreamError
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

log = logging.getLogger(__name__)

ALREADY_REQUESTED = rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED
# How long an "already requested" answer of a hedge waits for this delivery's earlier call.
OWN_ANSWER_GRACE = 1.0


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"  # the runtime answered (accepted, already stopped or finished)
    UNDELIVERED = "UNDELIVERED"  # the runtime stayed unreachable until the deadline
    REJECTED = "REJECTED"  # the runtime refused it for good (e.g. NOT_FOUND)


@dataclass(eq=False)
class StopDelivery:
    request: rt_pb.InterruptOperationRequest
    done: asyncio.Future[None]
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    # InterruptOperation calls sent, hedges included (attempts counts rounds of them).
    calls: int = 0
    response: rt_pb.InterruptOperationResponse | None = None
    error: UpstreamError | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list, repr=False)

    def waiter(self) -> asyncio.Future[None]:
        """A future of the caller's own, resolved in the turn the delivery settles (`done`'s
        awaiters wake a turn or two later, through its callbacks). Cancelling it (a caller's
        timeout) leaves the delivery alone."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.done.done():
            waiter.set_result(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def settle(self) -> None:
        """The delivery has its outcome (state set): resolve `done` and every waiter."""
        if not self.done.done():
            self.done.set_result(None)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    @property
    def operation_id(self) -> str:
        """The operation's id; empty for a stop by idempotency key (see `target`)."""
        return self.request.operation_id

    @property
    def target(self) -> str:
        return _target(self.request)


def _target(request: rt_pb.InterruptOperationRequest) -> str:
    """What a stop stops, for logs and for joining deliveries of the same stop (only a stop by
    the same owner joins: another principal's is answered apart, by the runtime's check)."""
    if request.idempotency_key:
        return f"key {request.idempotency_key!r} of {request.owner!r}"
    if request.owner:
        return f"{request.operation_id} of {request.owner!r}"
    return request.operation_id


def _settle_early(delivery: StopDelivery, answer: rt_pb.InterruptOperationResponse) -> None:
    """The first call's answer, handed to whoever waits on the delivery in the turn it arrives
    in (RuntimeLink.interrupt_now's `on_answer`), when it is the delivery's only call so far
    (so it is this stop's own answer: see `_own_answer`). The delivery's task takes the same
    answer a few turns of the loop later and does the bookkeeping; on the stop's
    acknowledgment those turns cost about 0.1 ms, each one run behind the operation's events
    arriving at the same moment."""
    if delivery.done.done() or delivery.calls != 1:
        return
    delivery.response = answer
    delivery.state = DeliveryState.DELIVERED
    delivery.settle()


class StopDeliverer:
    def __init__(
        self,
        link: RuntimeLink,
        deadline_seconds: float,
        on_undelivered: Callable[[StopDelivery], None],
        attempt_timeout: float = 2.0,
        # Short: once the runtime is back, a pending stop should land within this.
        max_backoff: float = 0.5,
        # A replica answers a stop in milliseconds; one that has not after this is probably
        # frozen or cut off, and another replica is asked too.
        hedge_delay: float = 0.15,
        max_calls: int = 3,
        meters: GatewayMetrics | None = None,
    ) -> None:
        self.metrics = meters or GatewayMetrics()
        self._link = link
        self._deadline = deadline_seconds
        self._on_undelivered = on_undelivered
        self._attempt_timeout = attempt_timeout
        self._max_backoff = max_backoff
        self._hedge_delay = hedge_delay
        self._max_calls = max_calls
        self._pending: dict[str, StopDelivery] = {}
        self.metrics.count_pending(self._pending.__len__)

    def deliver(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        owner: str = "",
        only_if_unwatched: bool = False,
        cause: op_pb.StopCause.ValueType = op_pb.STOP_CAUSE_USER,
    ) -> StopDelivery:
        """Start delivering (or join the delivery already under way for this operation, by the
        same owner). `owner` set: the runtime stops the operation only if it is that
        principal's."""
        request = rt_pb.InterruptOperationRequest(
            operation_id=operation_id,
            requested_by=requested_by,
            reason=reason,
            cause=cause,
            only_if_unwatched=only_if_unwatched,
            owner=owner,
        )
        current = self._pending.get(_target(request))
        if current is not None and (only_if_unwatched or not current.request.only_if_unwatched):
            return current
        return self._begin(request)

    def deliver_by_key(
        self,
        owner: str,
        idempotency_key: str,
        requested_by: str,
        reason: str,
        cause: op_pb.StopCause.ValueType,
    ) -> StopDelivery:
        """Deliver a stop by the owner's idempotency key (which may come before the start: the
        runtime then records it ahead of it), or join the delivery of the same stop."""
        request = rt_pb.InterruptOperationRequest(
            idempotency_key=idempotency_key,
            owner=owner,
            requested_by=requested_by,
            reason=reason,
            cause=cause,
        )
        current = self._pending.get(_target(request))
        return current if current is not None else self._begin(request)

    def pending_by_key(self, owner: str, idempotency_key: str) -> StopDelivery | None:
        """The stop by this key being delivered now, if any."""
        request = rt_pb.InterruptOperationRequest(idempotency_key=idempotency_key, owner=owner)
        return self._pending.get(_target(request))

    def _begin(self, request: rt_pb.InterruptOperationRequest) -> StopDelivery:
        delivery = StopDelivery(request, asyncio.get_running_loop().create_future())
        self._pending[delivery.target] = delivery
        # A child of the stop call's span; the runtime's InterruptOperation spans are its
        # children (the delivery's calls are made in a context with it current).
        span = tracing.child_span(
            "stop delivery",
            attributes={"stopline.operation_id": delivery.operation_id}
            if delivery.operation_id
            else {"stopline.by_key": True},
        )
        context = tracing.context_with_span(span) or contextvars.copy_context()
        # The first call is made here, in the stop call's own turn of the loop, so that its
        # request leaves first, ahead of the notices to the operation's streams that the caller
        # sends next (made from the delivery's task, it went out after them: a client's
        # acknowledgment waited about 0.3 ms longer, bench/timeline.py).
        # It goes to the replica running the operation where this gateway knows it (the stop
        # then reaches the runner with no hop between replicas); hedges and retries to any.
        first = context.run(self._send, delivery, True, functools.partial(_settle_early, delivery))
        delivery.task = asyncio.create_task(
            self._run(delivery, span, first), name=f"stop {delivery.target}", context=context
        )
        return delivery

    def _send(
        self,
        delivery: StopDelivery,
        routed: bool = False,
        on_answer: Callable[[rt_pb.InterruptOperationResponse], None] | None = None,
    ) -> asyncio.Future[rt_pb.InterruptOperationResponse]:
        """One InterruptOperation call of this delivery, begun now."""
        delivery.calls += 1
        self.metrics.delivery_calls.inc()
        return self._link.interrupt_now(
            delivery.request, self._attempt_timeout, routed, on_answer=on_answer
        )

    async def _run(
        self,
        delivery: StopDelivery,
        span: trace.Span,
        first: asyncio.Future[rt_pb.InterruptOperationResponse] | None,
    ) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_delay(self._deadline),
            wait=backoff(self._max_backoff),
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )
        began = time.monotonic()
        failed = ""
        try:
            async for attempt in retrying:
                with attempt:
                    delivery.attempts += 1
                    if delivery.attempts > 1:
                        self.metrics.delivery_retries.inc()
                        log.info(
                            "stop delivery retry",
                            extra=logs.fields(
                                stop_of=delivery.target, attempt=delivery.attempts, after=failed
                            ),
                        )
                    # The first attempt's first call went out in _begin; a retry's goes now.
                    call = first if first is not None else self._send(delivery)
                    first = None
                    try:
                        delivery.response = await self._attempt(delivery, call)
                    except UpstreamError as exc:
                        failed = str(exc)
                        raise
            delivery.state = DeliveryState.DELIVERED
        except UpstreamError as exc:
            delivery.error = exc
            if is_retryable(exc):
                delivery.state = DeliveryState.UNDELIVERED
                log.error(
                    "stop NOT delivered",
                    extra=logs.fields(
                        stop_of=delivery.target,
                        attempts=delivery.attempts,
                        deadline_s=self._deadline,
                        error=str(exc),
                    ),
                )
                self._on_undelivered(delivery)
            else:
                delivery.state = DeliveryState.REJECTED
        finally:
            if first is not None:  # cancelled before its first attempt began
                first.cancel()
            outcome = delivery.state.value.lower()  # pending: the gateway closed first
            self.metrics.delivery.labels(outcome).observe(time.monotonic() - began)
            span.set_attributes(
                {
                    "stopline.delivery.outcome": outcome,
                    "stopline.delivery.attempts": delivery.attempts,
                }
            )
            span.end()
            if self._pending.get(delivery.target) is delivery:
                del self._pending[delivery.target]
            delivery.settle()

    async def _attempt(
        self,
        delivery: StopDelivery,
        first: asyncio.Future[rt_pb.InterruptOperationResponse],
    ) -> rt_pb.InterruptOperationResponse:
        """One attempt: the first answer of up to `max_calls` calls (`first`, already sent,
        and the next sent when none has answered within `hedge_delay` or when one failed). A
        definitive refusal (NOT_FOUND, ...) ends the attempt at once; it fails with the last
        error when every call failed."""
        pending = {first}
        sent = 1
        last_error: BaseException | None = None
        try:
            while True:
                done, pending = await asyncio.wait(
                    pending,
                    timeout=self._hedge_delay if sent < self._max_calls else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                answers = [task.result() for task in done if task.exception() is None]
                if answers:
                    # Calls answering together: the one that says what this stop did first.
                    answer = min(answers, key=lambda a: a.outcome == ALREADY_REQUESTED)
                    if answer.outcome == ALREADY_REQUESTED and pending:
                        return await self._own_answer(answer, pending)
                    return answer
                for task in done:
                    error = task.exception()
                    assert error is not None
                    if not is_retryable(error):
                        raise error
                    last_error = error
                if not pending and sent == self._max_calls:
                    assert last_error is not None
                    raise last_error
                if sent < self._max_calls:
                    sent += 1
                    pending.add(self._send(delivery))
        finally:
            for task in pending:
                task.cancel()

    async def _own_answer(
        self,
        answer: rt_pb.InterruptOperationResponse,
        pending: set[asyncio.Future[rt_pb.InterruptOperationResponse]],
    ) -> rt_pb.InterruptOperationResponse:
        """A hedge found the stop already requested while an earlier call of this delivery is
        still out: most likely that call recorded it and only its answer is slow. Its answer
        (accepted, recorded ahead of the start) is the true one for this client, so it is
        waited for, briefly; otherwise the client would be told its own stop came second."""
        done, _ = await asyncio.wait(pending, timeout=OWN_ANSWER_GRACE)
        for task in done:
            if not task.cancelled() and task.exception() is None:
                own = task.result()
                if own.outcome != ALREADY_REQUESTED:
                    return own
        return answer

    async def close(self) -> None:
        """Shutdown: stops still being delivered are logged as undelivered, by operation id."""
        deliveries = list(self._pending.values())
        for delivery in deliveries:
            log.error("gateway shutting down: stop of %s NOT delivered", delivery.target)
            if delivery.task is not None:
                delivery.task.cancel()
        tasks = [d.task for d in deliveries if d.task is not None]
        if tasks:
            await asyncio.wait(tasks)
