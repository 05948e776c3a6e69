"""StopDeliverer's hedging against a scripted runtime link: a replica that does not answer is not
waited on, a definitive refusal ends the delivery, and the calls per attempt stay bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc

from gateway_service.delivery import DeliveryState, StopDeliverer
from gateway_service.runtime_link import RuntimeLink
from stopline.grpc_status import UpstreamError
from stopline.v1 import runtime_service_pb2 as rt_pb

ANSWER = rt_pb.InterruptOperationResponse(outcome=rt_pb.INTERRUPT_OUTCOME_ACCEPTED)
OP_ID = "00000000-0000-4000-8000-000000000001"


class ScriptedLink:
    """Each InterruptOperation call does what the next entry says: "hang" (a frozen replica:
    never answers until cancelled), "ok", or a status code to fail with."""

    def __init__(self, *script: str | grpc.StatusCode) -> None:
        self.script = list(script)
        self.cancelled = 0
        self.released = asyncio.Event()
        self.routed: list[bool] = []  # whether each call was to go to the operation's replica

    def interrupt_now(
        self,
        request: rt_pb.InterruptOperationRequest,
        deadline_seconds: float,
        routed: bool = False,
        on_answer: Callable[[rt_pb.InterruptOperationResponse], None] | None = None,
    ) -> asyncio.Future[rt_pb.InterruptOperationResponse]:
        self.routed.append(routed)
        step = self.script.pop(0) if self.script else "ok"
        return asyncio.ensure_future(self._answered(self._interrupt(step), on_answer))

    @staticmethod
    async def _answered(
        answer: Awaitable[rt_pb.InterruptOperationResponse],
        on_answer: Callable[[rt_pb.InterruptOperationResponse], None] | None,
    ) -> rt_pb.InterruptOperationResponse:
        response = await answer  # as RuntimeLink's: told in the turn the answer arrives in
        if on_answer is not None:
            on_answer(response)
        return response

    async def _interrupt(self, step: str | grpc.StatusCode) -> rt_pb.InterruptOperationResponse:
        if step == "slow-ahead":  # recorded the stop (ahead of its start), answers late
            await self.released.wait()
            return rt_pb.InterruptOperationResponse(outcome=rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD)
        if step == "already":  # a later call: the stop is there already
            self.released.set()
            return rt_pb.InterruptOperationResponse(
                outcome=rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED
            )
        if step == "hang":
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                self.cancelled += 1
        if isinstance(step, grpc.StatusCode):
            raise UpstreamError(step, "scripted")
        return ANSWER


def deliverer(link: ScriptedLink, **settings: Any) -> StopDeliverer:
    return StopDeliverer(
        cast(RuntimeLink, link), deadline_seconds=5, on_undelivered=lambda d: None, **settings
    )


async def test_a_replica_that_does_not_answer_is_not_waited_on() -> None:
    link = ScriptedLink("hang", "ok")
    # With hour-long attempts, only the hedge can deliver this stop within the test.
    delivery = deliverer(link, attempt_timeout=3600, hedge_delay=0.01).deliver(OP_ID, "t", "")
    await asyncio.wait_for(delivery.done, 10)
    assert delivery.state is DeliveryState.DELIVERED and delivery.response == ANSWER
    assert (delivery.attempts, delivery.calls) == (1, 2)
    assert link.cancelled == 1  # the call still waiting on the frozen replica is given up
    # The first call to the operation's own replica (where the gateway knows it), the hedge to
    # any: the frozen one may be that replica.
    assert link.routed == [True, False]


async def test_a_failed_call_is_followed_at_once_and_a_refusal_ends_the_delivery() -> None:
    link = ScriptedLink(grpc.StatusCode.UNAVAILABLE, "hang", grpc.StatusCode.NOT_FOUND)
    delivery = deliverer(link, attempt_timeout=3600, hedge_delay=0.01).deliver(OP_ID, "t", "")
    await asyncio.wait_for(delivery.done, 10)
    assert delivery.state is DeliveryState.REJECTED
    assert delivery.error is not None and delivery.error.code is grpc.StatusCode.NOT_FOUND
    assert (delivery.attempts, delivery.calls) == (1, 3)
    assert link.routed == [True, False, False]
    assert link.cancelled == 1


async def test_calls_per_attempt_are_bounded_then_the_attempt_is_retried() -> None:
    link = ScriptedLink(*[grpc.StatusCode.UNAVAILABLE] * 3)
    delivery = deliverer(link, hedge_delay=3600, max_backoff=0.01).deliver(OP_ID, "t", "")
    await asyncio.wait_for(delivery.done, 10)
    assert delivery.state is DeliveryState.DELIVERED
    assert (delivery.attempts, delivery.calls) == (2, 4)


async def test_a_hedge_finding_the_stop_requested_waits_for_this_deliverys_own_answer() -> None:
    """The first call recorded the stop but answers after the hedge went out; the hedge finds it
    already requested. The client is told what its own stop did (recorded ahead), not that it
    came second."""
    link = ScriptedLink("slow-ahead", "already")
    delivery = deliverer(link, attempt_timeout=3600, hedge_delay=0.01).deliver(OP_ID, "t", "")
    await asyncio.wait_for(delivery.done, 10)
    assert delivery.state is DeliveryState.DELIVERED and delivery.response is not None
    assert delivery.response.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD
    assert delivery.calls == 2


async def test_only_a_stop_by_the_same_owner_joins_a_delivery_under_way() -> None:
    """A principal's stop joins its own delivery in flight, never another principal's: each
    gets the answer the runtime gives its own owner (the runtime checks `owner`)."""
    link = ScriptedLink("hang", "hang")
    stops = deliverer(link, attempt_timeout=3600, hedge_delay=3600)
    alice = stops.deliver(OP_ID, "alice", "", owner="alice")
    assert stops.deliver(OP_ID, "alice", "again", owner="alice") is alice
    mallory = stops.deliver(OP_ID, "mallory", "", owner="mallory")
    assert mallory is not alice
    assert (alice.request.owner, mallory.request.owner) == ("alice", "mallory")
    await stops.close()


async def test_the_first_call_is_sent_before_deliver_returns() -> None:
    """The stop's first InterruptOperation is begun in the caller's own turn of the loop, so it
    leaves ahead of whatever the caller schedules next (the stop's notices to its streams)."""
    sent: list[str] = []
    link = ScriptedLink()
    real = link.interrupt_now

    def interrupt_now(
        request: rt_pb.InterruptOperationRequest,
        deadline_seconds: float,
        routed: bool = False,
        on_answer: Callable[[rt_pb.InterruptOperationResponse], None] | None = None,
    ) -> asyncio.Future[rt_pb.InterruptOperationResponse]:
        sent.append(request.operation_id)
        return real(request, deadline_seconds, routed, on_answer)

    link.interrupt_now = interrupt_now  # type: ignore[method-assign]
    delivery = deliverer(link).deliver(OP_ID, "t", "")
    assert sent == [OP_ID]  # no await in between
    await asyncio.wait_for(delivery.done, 10)
    assert delivery.state is DeliveryState.DELIVERED and delivery.calls == 1


async def test_the_first_calls_answer_reaches_the_waiter_before_the_bookkeeping() -> None:
    """The only call's answer settles the delivery from the call's completion; the delivery's
    task (retries, metrics, span) finishes after, off the acknowledgment's path."""
    delivery = deliverer(ScriptedLink("ok")).deliver(OP_ID, "t", "")
    task = delivery.task
    assert task is not None
    seen: list[bool] = []
    delivery.done.add_done_callback(lambda _: seen.append(task.done()))
    await asyncio.wait_for(delivery.done, 10)
    assert seen == [False]
    assert delivery.state is DeliveryState.DELIVERED and delivery.response == ANSWER
    await asyncio.wait_for(task, 10)
    assert delivery.state is DeliveryState.DELIVERED and delivery.attempts == 1


async def test_a_stops_caller_is_woken_in_the_turn_the_first_answer_arrives_in() -> None:
    """RuntimeLink hands the first call's answer over as it arrives (`on_answer`), and the
    delivery resolves its callers' waiters right then: the acknowledgment does not wait for the
    call's future to finish, for `done`'s callbacks and for a wait's own wake-up."""
    delivery = deliverer(ScriptedLink("ok")).deliver(OP_ID, "t", "")
    waiter = delivery.waiter()
    turns = 0
    while not waiter.done():
        await asyncio.sleep(0)
        turns += 1
    # The scripted call answers in the first turn of its task: the waiter is resolved in it.
    assert turns == 1
    assert delivery.state is DeliveryState.DELIVERED and delivery.response == ANSWER
    assert delivery.task is not None and not delivery.task.done()  # bookkeeping comes after
    late = delivery.waiter()  # a caller arriving after the answer is not kept waiting
    assert late.done()
    await asyncio.wait_for(delivery.task, 10)
