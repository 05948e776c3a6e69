"""The gateway's use cases in plain Python; the servicer only translates to and from protobuf.

Guarantees kept here:
- A stop is never lost to timing. A client that cancels while its start is still in flight gets
  the stop applied as soon as the runtime answers; because the gateway starts every operation
  *held* (the runtime runs no step until released), that stop lands while the operation is still
  PENDING, so no step ever runs; also when the start's answer was lost and the retry found the
  operation already created (`Starter.start`). A client may also stop by its start's
  idempotency key before it has the id (the runtime records the stop ahead of the start if
  needed); the hold is released as soon as the id is sent, after any such stop in flight here.
  A client that asks for `no_hold` trades the first of these for a faster first step: its
  operation runs at once (starting.py), and a cancel during the start may cut a step mid-step.
- A stream never shows a gap or a repeat (follow.py).
- A stop is acknowledged to every local client of the operation at once, then delivered at least
  once (delivery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from gateway_service.config import GatewayConfig
from gateway_service.delivery import DeliveryState, StopDeliverer, StopDelivery
from gateway_service.follow import Follower
from gateway_service.metrics import GatewayMetrics
from gateway_service.ownership import OwnerCache
from gateway_service.policies import (
    CLIENT_CANCELLED,
    GRACE_LABEL,
    POLICY_LABEL,
    CancelPolicy,
    policy_from_labels,
)
from gateway_service.runtime_link import RuntimeLink
from gateway_service.starting import Started, Starter
from gateway_service.streams import (
    StopRequestedItem,
    StopUndeliveredItem,
    StreamItem,
    StreamRegistry,
)
from stopline import logs
from stopline.errors import InvalidArgument, ResourceExhausted, operation_not_found
from stopline.grpc_status import UpstreamError
from stopline.ids import parse_operation_id
from stopline.json_values import shown
from stopline.limits import (
    MAX_REASON,
    StreamLimiter,
    check_input_size,
    check_page_size,
    struct_to_input,
)
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

log = logging.getLogger(__name__)

GATEWAY = "gateway"
# What max_running_per_principal counts: operations that have not ended (STOPPING is RUNNING
# with a stop recorded; the runtime lists it apart from RUNNING).
UNFINISHED = (
    op_pb.OPERATION_STATUS_PENDING,
    op_pb.OPERATION_STATUS_RUNNING,
    op_pb.OPERATION_STATUS_STOPPING,
)


@dataclass(frozen=True, slots=True)
class Accepted:
    """First item of a start-and-stream: the operation exists."""

    operation: op_pb.Operation


@dataclass(frozen=True, slots=True)
class Limits:
    """A start's deadline (unset: the runtime's default) and step budget (0: the default)."""

    deadline: duration_pb2.Duration | None = None
    max_steps: int = 0


@dataclass(frozen=True, slots=True)
class StopAnswer:
    delivered: bool
    response: rt_pb.InterruptOperationResponse | None = None


def _end_watch(start: asyncio.Task[Started]) -> None:
    """Cancel a start's stream once its call is over (harmless if it has ended)."""
    if start.cancelled() or start.exception() is not None:
        return
    start.result().watch.cancel()


class Gateway:
    def __init__(self, config: GatewayConfig, link: RuntimeLink) -> None:
        self.config = config
        self.link = link
        self.streams = StreamRegistry()
        self.metrics = GatewayMetrics()
        self.follower = Follower(
            link,
            self.streams,
            config.stream_idle_seconds,
            config.watch_reconnect_deadline_seconds,
            on_stop_seen=self.metrics.client_stop.observe,
            on_event_sent=self.metrics.stream_lag.observe,
        )
        self.metrics.count_open_streams(lambda: self.streams.open_count)
        self.deliverer = StopDeliverer(
            link,
            config.stop_delivery_deadline_seconds,
            self._report_undelivered,
            meters=self.metrics,
        )
        self._background: set[asyncio.Task[Any]] = set()
        self.stream_slots = StreamLimiter(config.max_streams, config.max_streams_per_principal)
        self.owners = OwnerCache(config.owner_cache_size)
        self.starter = Starter(config, link, self.deliverer)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background))
        await self.deliverer.close()
        await self.link.close()

    async def settle(self) -> None:
        """Until background work (cancel policies, releases, their timers) has finished; for
        tests and operators that need to know a policy has been applied."""
        while pending := [t for t in self._background if t.get_name() != "start"]:
            await asyncio.wait(pending)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Background work that must outlive the client call that caused it."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ start and stream

    def check_grace(self, policy: CancelPolicy, grace: float | None) -> float:
        if grace is None:
            return self.config.default_cancel_grace_seconds
        limit = self.config.max_cancel_grace_seconds
        if not math.isfinite(grace) or not 0 <= grace <= limit:
            raise InvalidArgument("cancel_grace", f"must be between 0 and {shown(limit)} seconds")
        return grace

    async def start_and_stream(
        self,
        agent: str,
        input_value: struct_pb2.Struct,
        idempotency_key: str,
        policy: CancelPolicy,
        grace: float,
        owner: str,
        why_gone: Callable[[], str] = lambda: CLIENT_CANCELLED,
        limits: Limits | None = None,
        hold: bool = True,
    ) -> AsyncGenerator[Accepted | StreamItem, None]:
        """`limits`: the start's deadline and step budget, passed to the runtime as given (the
        runtime applies its defaults and caps). `hold` False: the client's `no_hold`, an unheld
        start whose events come back on the start's own stream (starting.py)."""
        check_input_size(struct_to_input(input_value), self.config.max_input_bytes)
        await self._check_running(owner)
        # The gateway always sends a key, so it can retry a start whose answer was lost. The
        # runtime scopes keys by owner, so principals cannot reach each other's operations.
        key = idempotency_key or f"gateway-{uuid.uuid4()}"
        generated_key = not idempotency_key
        request = rt_pb.StartOperationRequest(
            agent=agent,
            idempotency_key=key,
            owner=owner,
            labels={POLICY_LABEL: policy.value, GRACE_LABEL: f"{grace:g}"},
            # Nobody else knows a generated key, so no stop by it can come ahead of the start:
            # the runtime skips its look for one (on PostgreSQL, a round trip).
            key_private=generated_key,
        )
        if hold:
            request.hold.CopyFrom(
                duration_pb2.Duration(seconds=math.ceil(self.config.start_hold_seconds))
            )
        request.input.CopyFrom(input_value)
        if limits is not None:
            if limits.deadline is not None:
                request.deadline.CopyFrom(limits.deadline)
            request.max_steps = limits.max_steps
        start = self._spawn(self.starter.start(request, generated_key, hold), name="start")
        try:
            started = await asyncio.shield(start)
            response = started.response
            operation_id = response.operation.id
            self.owners.remember(response.operation)
            logs.bind(operation_id=operation_id)  # the rest of this call is about it
            log.info("start accepted", extra=logs.fields(agent=agent, created=response.created))
            yield Accepted(response.operation)
            # The client has the id now (this generator resumes once the message is written):
            # release at once. A client that must stop before any step stops by its key, which
            # needs no window (see README, Held starts).
            if started.ours and started.held:
                release = self.starter.release_unless_stopping(operation_id, owner, key)
                self._spawn(release, name=f"release {operation_id}")
            # The events so far come on the start's own stream; after a break the follower
            # resumes with a watch of its own from the last seq it forwarded.
            async for item in self.follower.follow(operation_id, 0, started.watch.events()):
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            # Only a client that went away (cancelled call, dropped connection) triggers its
            # policy; a stream that ended in an error says so to a client that is still there.
            self._client_gone(start, None, policy, grace, why_gone(), owner)
            raise
        finally:
            # The start's stream ends with this call, also when nobody read it (the client left
            # before, or during, the start).
            start.add_done_callback(_end_watch)

    async def _check_running(self, owner: str) -> None:
        """max_running_per_principal: count the owner's unfinished operations on the runtime
        (every gateway's starts), paging only until the limit is reached. Best effort: starts
        that race each other can pass together, and a repeated start (same idempotency key) of
        an operation that is still running counts that operation too."""
        limit = self.config.max_running_per_principal
        if limit is None:
            return
        count = 0
        for status in UNFINISHED:
            request = rt_pb.ListOperationsRequest(status=status, owner=owner)
            while True:
                page = await self.link.list(request)
                count += len(page.operations)
                if count >= limit:
                    raise ResourceExhausted(
                        f"max_running_per_principal ({limit}) reached; "
                        "stop or wait for one of your operations"
                    )
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token

    # ------------------------------------------------------------------ reconnect

    async def stream(
        self,
        operation_id: str,
        after_seq: int,
        owner: str,
        why_gone: Callable[[], str] = lambda: CLIENT_CANCELLED,
    ) -> AsyncGenerator[StreamItem, None]:
        op_id = parse_operation_id(operation_id)
        if after_seq < 0:
            raise InvalidArgument("after_seq", f"must not be negative, got {after_seq}")
        operation = self.owners.check((await self.link.get(op_id)).operation, owner)
        policy, grace = policy_from_labels(operation.labels)
        try:
            async for item in self.follower.follow(op_id, after_seq):
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            self._client_gone(None, op_id, policy, grace, why_gone(), owner)
            raise

    # ------------------------------------------------------------------ stopping

    async def stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        owner: str,
        idempotency_key: str = "",
    ) -> StopAnswer:
        """Stop by operation id, or by the idempotency key of the caller's start (which may not
        have reached the runtime yet: the runtime then records the stop ahead of it)."""
        if len(reason) > MAX_REASON:
            raise InvalidArgument(
                "reason", f"is {len(reason)} characters; the limit is {MAX_REASON}"
            )
        began = time.monotonic()
        if idempotency_key:
            if operation_id:
                raise InvalidArgument(
                    "operation_id", "set exactly one of operation_id and idempotency_key"
                )
            # Keys are scoped by owner at the runtime (which also checks the key's length): no
            # ownership check is needed.
            delivery = self.deliverer.deliver_by_key(
                owner, idempotency_key, requested_by, reason, op_pb.STOP_CAUSE_USER
            )
            streams_told = False
        else:
            op_id = parse_operation_id(operation_id)
            known = self.owners.owner(op_id)
            if known is None and not owner:
                await self.owners.require(op_id, owner, self._fetch)
                known = owner
            if known is not None and known != owner:
                raise operation_not_found(op_id)
            # An owner this gateway has not seen (an operation started through another
            # replica) is checked by the runtime, in the stop's own write (`owner` on the
            # request), instead of by a read before it; the operation's streams here (there
            # are none: a stream would have told this gateway the owner) learn of it below.
            streams_told = known is not None
            delivery = self._request_stop(
                op_id, requested_by, reason, op_pb.STOP_CAUSE_USER, owner, streams=streams_told
            )
        # The caller's own waiter wakes this in the turn the runtime's answer arrives in.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.stop_ack_seconds):
                await delivery.waiter()
        delivered = delivery.state is DeliveryState.DELIVERED
        self.metrics.stop_ack.labels(str(delivered).lower()).observe(time.monotonic() - began)
        log.info(
            "stop requested",
            extra=logs.fields(
                operation_id=operation_id or None,
                by_key=bool(idempotency_key),
                delivery=delivery.state.value,
            ),
        )
        if not delivery.done.done():
            return StopAnswer(delivered=False)
        if delivery.state is DeliveryState.DELIVERED:
            assert delivery.response is not None
            stopped = delivery.response.operation.id
            if stopped and not streams_told:
                # The key named an operation, or the runtime vouched for its owner: its local
                # clients learn of the stop too.
                self.owners.remember(delivery.response.operation)
                self.streams.notify(stopped, StopRequestedItem(requested_by, reason))
            return StopAnswer(delivered=True, response=delivery.response)
        assert delivery.error is not None
        raise delivery.error

    def _request_stop(
        self,
        op_id: str,
        requested_by: str,
        reason: str,
        cause: op_pb.StopCause.ValueType,
        owner: str,
        only_if_unwatched: bool = False,
        streams: bool = True,
    ) -> StopDelivery:
        """`streams` False: the owner is not known here yet (the runtime checks it), so the
        operation's local clients are told only once the runtime has answered."""
        delivery = self.deliverer.deliver(
            op_id, requested_by, reason, owner, only_if_unwatched, cause
        )
        if streams and not only_if_unwatched:
            # Every local client of the operation learns of the stop now, not after the runtime
            # (told after the delivery began, so the call to the runtime goes out first).
            self.streams.notify(op_id, StopRequestedItem(requested_by, reason))
        return delivery

    def _report_undelivered(self, delivery: StopDelivery) -> None:
        if self.owners.owner(delivery.operation_id) != delivery.request.owner:
            return  # a stop whose owner nobody vouched for: not for the operation's clients
        self.streams.notify(
            delivery.operation_id,
            StopUndeliveredItem(str(delivery.error), delivery.attempts),
        )

    def _client_gone(
        self,
        start: asyncio.Task[Started] | None,
        op_id: str | None,
        policy: CancelPolicy,
        grace: float,
        reason: str,
        owner: str,
    ) -> None:
        """A client's stream ended before its operation did: apply its cancel policy. Runs from
        a `finally` of a cancelled call, so it only schedules work, never awaits. `reason` is
        the stop's reason under the STOP policy (a cancelled call, or the client's deadline);
        `owner`, the operation's (the stream's caller)."""
        log.info("client gone", extra=logs.fields(policy=policy.value, reason=reason))
        self._spawn(
            self._apply_policy(start, op_id, policy, grace, reason, owner), name="cancel policy"
        )

    async def _apply_policy(
        self,
        start: asyncio.Task[Started] | None,
        op_id: str | None,
        policy: CancelPolicy,
        grace: float,
        reason: str,
        owner: str,
    ) -> None:
        held = True
        if start is not None:
            try:
                started = await start
            except UpstreamError as exc:
                log.warning("client left during a start that failed (%s): nothing to stop", exc)
                return
            op_id = started.response.operation.id
            if not started.ours:
                return  # a repeat of an earlier call's start: its own client decides
            held = started.held
        assert op_id is not None
        if policy is CancelPolicy.STOP:
            # Still held if the client left during a held start: the stop wins before any step.
            # Unheld (no_hold), its first step may have begun: the stop cuts it mid-step.
            self._request_stop(op_id, GATEWAY, reason, op_pb.STOP_CAUSE_CLIENT_GONE, owner)
            return
        if held:
            await self.starter.release(op_id)
        if policy is CancelPolicy.STOP_AFTER_GRACE:
            await asyncio.sleep(grace)  # a timer: the policy's grace period
            if self.streams.count(op_id) == 0:
                # The runtime re-checks: a client may have reconnected through another gateway.
                self._request_stop(
                    op_id,
                    GATEWAY,
                    f"nobody reconnected within {grace:g}s",
                    op_pb.STOP_CAUSE_GRACE_EXPIRED,
                    owner,
                    only_if_unwatched=True,
                )

    # ------------------------------------------------------------------ reads

    async def _fetch(self, op_id: str) -> op_pb.Operation:
        return (await self.link.get(op_id)).operation

    async def get(self, operation_id: str, owner: str) -> op_pb.Operation:
        return self.owners.check(await self._fetch(parse_operation_id(operation_id)), owner)

    # ------------------------------------------------------------------ waiting for a person

    async def answer(
        self, request: rt_pb.AnswerInputRequest, owner: str
    ) -> rt_pb.AnswerInputResponse:
        """Answer an input request of the caller's operation: checked here (NOT_FOUND for
        anyone else's) and again by the runtime (`owner` on the request)."""
        op_id = parse_operation_id(request.operation_id)
        await self.owners.require(op_id, owner, self._fetch)
        request.operation_id, request.owner = op_id, owner
        return await self.link.answer(request)

    async def pause(
        self, operation_id: str, requested_by: str, owner: str
    ) -> rt_pb.PauseOperationResponse:
        op_id = parse_operation_id(operation_id)
        await self.owners.require(op_id, owner, self._fetch)
        return await self.link.pause(
            rt_pb.PauseOperationRequest(operation_id=op_id, requested_by=requested_by, owner=owner)
        )

    async def resume(
        self, operation_id: str, requested_by: str, owner: str
    ) -> rt_pb.ResumeOperationResponse:
        op_id = parse_operation_id(operation_id)
        await self.owners.require(op_id, owner, self._fetch)
        return await self.link.resume(
            rt_pb.ResumeOperationRequest(operation_id=op_id, requested_by=requested_by, owner=owner)
        )

    async def stop_matching(
        self, request: rt_pb.StopOperationsRequest, owner: str
    ) -> rt_pb.StopOperationsResponse:
        """Bulk stop of the caller's own operations: the runtime stops exactly `owner`'s."""
        if not owner:
            # The runtime reads an empty owner as "operations without one": never a caller's.
            raise AssertionError("bulk stop without a principal")
        request.owner = owner
        return await self.link.stop_matching(request)

    async def list(
        self, request: rt_pb.ListOperationsRequest, owner: str
    ) -> rt_pb.ListOperationsResponse:
        if not owner:
            # The runtime reads an empty owner as "every owner": never let that through.
            raise AssertionError("list without a principal")
        check_page_size(request.page_size, self.config.max_page_size)
        request.owner = owner
        return await self.link.list(request)
