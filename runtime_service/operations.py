"""The runtime's use cases in plain Python: start (starts.py), get, list, interrupt and watch
operations.

The gRPC servicer is a thin translation layer over this class, and tests drive it directly. All
validation of caller input happens here (its checks in caller_input.py), raising the domain errors
of stopline.errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runtime_service import stop_causes, waiting
from runtime_service.agents.registry import AgentRegistry
from runtime_service.caller_input import (
    MAX_AGENT_NAME,
    MAX_IDEMPOTENCY_KEY,
    bounded_text,
    check_answer_fields,
    check_labels,
)
from runtime_service.config import RuntimeConfig
from runtime_service.domain import (
    AnswerOutcome,
    AnswerResult,
    Event,
    InterruptOutcome,
    InterruptResult,
    Operation,
    OperationStatus,
    PauseResult,
    RecordedAhead,
    ResumeResult,
    StopCause,
)
from runtime_service.hub import EventHub
from runtime_service.pagination import decode_page_token, encode_page_token
from runtime_service.runner import Runner
from runtime_service.starts import Starting
from runtime_service.storage import STOPPING, ListCursor, Storage, utcnow
from runtime_service.watching import Watches
from stopline import logs
from stopline.errors import (
    InvalidArgument,
    NotFound,
    operation_not_found,
)
from stopline.ids import parse_operation_id
from stopline.json_values import shown
from stopline.limits import (
    MAX_OWNER,
    MAX_REASON,
    MAX_REQUESTED_BY,
    check_page_size,
)

log = logging.getLogger(__name__)

LIST_FILTERS = frozenset({*(s.value for s in OperationStatus), STOPPING})


# Bulk stop: at most this many operations per call (the answer says when more may match), read
# in pages of this size.
BULK_STOP_LIMIT = 1000
BULK_PAGE = 200
# In the order operations move through them (a paused one resumes waiting or pending, a waiting
# one becomes pending, a pending one running), so one moving on meanwhile is still found later.
BULK_STATUSES = (
    OperationStatus.PAUSED.value,
    OperationStatus.WAITING.value,
    OperationStatus.PENDING.value,
    OperationStatus.RUNNING.value,
)


@dataclass(frozen=True, slots=True)
class BulkStopped:
    """What one bulk stop did: the operations it stopped, and whether it stopped as many as one
    call may while more matched."""

    operation_ids: tuple[str, ...]
    limit_reached: bool


class OperationsService(Starting):
    def __init__(
        self,
        config: RuntimeConfig,
        storage: Storage,
        agents: AgentRegistry,
        hub: EventHub,
        runner: Runner,
    ) -> None:
        self.config = config
        self.storage = storage
        self.agents = agents
        self.hub = hub
        self.runner = runner
        self.watches = Watches(storage, hub, config.watch_poll_seconds)

    async def get(self, operation_id: str) -> Operation:
        op_id = parse_operation_id(operation_id)
        operation = await self.storage.get(op_id)
        if operation is None:
            raise operation_not_found(op_id)
        return operation

    async def list(
        self, status: str | None, page_size: int, page_token: str, owner: str = ""
    ) -> tuple[list[Operation], str]:
        """A page newest first; a non-empty `owner` lists only that owner's operations."""
        if status is not None and status not in LIST_FILTERS:
            raise InvalidArgument("status", f"unknown status {shown(status)}")
        check_page_size(page_size, self.config.max_page_size)
        limit = page_size or self.config.default_page_size
        cursor = decode_page_token(page_token, status) if page_token else None
        page, next_cursor = await self.storage.list_page(status, limit, cursor, owner or None)
        token = encode_page_token(next_cursor, status) if next_cursor is not None else ""
        return page, token

    async def interrupt(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        only_if_unwatched: bool = False,
        cause: StopCause = StopCause.OPERATOR,
        owner: str = "",
    ) -> InterruptResult:
        """`owner` set: only that principal's operation is stopped (anyone else's is the
        unknown-id NOT_FOUND), checked by the stop's write itself."""
        op_id = parse_operation_id(operation_id)
        by = bounded_text(requested_by, "requested_by", MAX_REQUESTED_BY)
        why = bounded_text(reason, "reason", MAX_REASON)
        bounded_text(owner, "owner", MAX_OWNER)
        if only_if_unwatched and self.hub.watcher_count(op_id) > 0:
            operation = await self._owned_operation(op_id, owner)
            return InterruptResult(InterruptOutcome.SKIPPED_WATCHED, operation)
        result = await self._record_stop(op_id, by, why, cause, owner)
        if result is None:
            raise operation_not_found(op_id)
        return result

    async def _record_stop(
        self, op_id: str, by: str, why: str, cause: StopCause, owner: str = ""
    ) -> InterruptResult | None:
        """Record a stop, publish its events, and tell this replica's runner at once (another
        replica's runner hears of it by the stop's notification)."""
        here = self.runner.runs(op_id)  # then only this runner needs telling: see record_stop
        result = await self.storage.record_stop(op_id, by, why, cause, owner, runner_here=here)
        committed = utcnow()  # just after this call's stop committed: halt_ms runs from here
        if result is None:
            return None
        self.hub.publish(result.events)
        if not result.operation.status.is_terminal:
            ours = result.outcome is InterruptOutcome.ACCEPTED  # else recorded earlier, elsewhere
            self._tell_runner(op_id, ours, committed, stop_causes.label(cause))
        # After the runner is told: the step is cancelled before this line costs anything.
        _log_stop(op_id, result.outcome, cause, by)
        return result

    def _tell_runner(
        self, op_id: str, ours: bool, committed: datetime, cause: str | None = None
    ) -> None:
        """Hand a recorded stop to this replica's runner, and count a stop this call recorded
        by whether that runner runs the operation (else a notification must carry it)."""
        here = self.runner.deliver_stop(op_id, committed if ours else None, cause)
        if ours:
            self.runner.metrics.stops_recorded.labels(str(here).lower()).inc()

    def runs_here(self, operation_id: str) -> bool:
        """Whether this replica runs the operation now: a stop sent here reaches it with no
        notification between replicas."""
        return self.runner.runs(operation_id)

    async def stop_matching(
        self, owner: str, status: str | None, agent: str, labels: Mapping[str, str]
    ) -> BulkStopped:
        """Bulk stop: every unfinished operation of exactly `owner` ('' : those without one)
        matching the filters, each by its own stop write (so each gets its stop_requested event
        and its runner is told), up to BULK_STOP_LIMIT per call.

        Statuses are looked at in the order operations move through them (BULK_STATUSES): an
        operation claimed meanwhile is still found among the RUNNING. (One that moved back, from
        RUNNING to WAITING or PAUSED during the call, may be missed: call again.)"""
        if status is not None and status not in BULK_STATUSES:
            raise InvalidArgument(
                "status", "must be PENDING, RUNNING, WAITING or PAUSED (unset: all of them)"
            )
        wanted = check_labels(labels)
        bounded_text(agent, "agent", MAX_AGENT_NAME)
        checked_owner = bounded_text(owner, "owner", MAX_OWNER)
        cause = stop_causes.bulk_stop()
        stopped: list[str] = []
        for each in [status] if status is not None else BULK_STATUSES:
            cursor: ListCursor | None = None
            while True:
                page, cursor = await self.storage.list_page(each, BULK_PAGE, cursor, checked_owner)
                for operation in page:
                    if agent and operation.agent != agent:
                        continue
                    if any(operation.labels.get(k) != v for k, v in wanted.items()):
                        continue
                    if len(stopped) >= BULK_STOP_LIMIT:
                        return BulkStopped(tuple(stopped), limit_reached=True)
                    result = await self._record_stop(
                        operation.id, cause.requested_by, cause.reason, cause.cause
                    )
                    if result is not None and result.outcome is InterruptOutcome.ACCEPTED:
                        stopped.append(operation.id)
                if cursor is None:
                    break
        return BulkStopped(tuple(stopped), limit_reached=False)

    async def interrupt_by_key(
        self,
        idempotency_key: str,
        owner: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
    ) -> InterruptResult | RecordedAhead:
        """A stop by the owner's idempotency key, which may come before the start: see
        Storage.record_stop_by_key."""
        key = bounded_text(idempotency_key, "idempotency_key", MAX_IDEMPOTENCY_KEY)
        checked_owner = bounded_text(owner, "owner", MAX_OWNER)
        by = bounded_text(requested_by, "requested_by", MAX_REQUESTED_BY)
        why = bounded_text(reason, "reason", MAX_REASON)
        result = await self.storage.record_stop_by_key(
            checked_owner, key, by, why, cause, self.config.stop_tombstone_seconds
        )
        committed = utcnow()
        if isinstance(result, InterruptResult):
            self.hub.publish(result.events)
            if not result.operation.status.is_terminal:
                ours = result.outcome is InterruptOutcome.ACCEPTED
                self._tell_runner(result.operation.id, ours, committed)
            _log_stop(result.operation.id, result.outcome, cause, by)
        else:
            _log_stop(None, None, cause, by, key=True)
        return result

    # ------------------------------------------------------------------ waiting for a person

    async def _owned(self, operation_id: str, owner: str) -> str:
        """The parsed id; the unknown-id NOT_FOUND when `owner` is set and is not the owner."""
        op_id = parse_operation_id(operation_id)
        if owner:
            await self._owned_operation(op_id, owner)
        return op_id

    async def _owned_operation(self, op_id: str, owner: str) -> Operation:
        """The operation; the unknown-id NOT_FOUND when `owner` is set and is not the owner."""
        operation = await self.get(op_id)
        if owner and operation.owner != owner:
            raise operation_not_found(op_id)
        return operation

    async def answer(
        self,
        operation_id: str,
        request_id: str,
        answer_id: str,
        answer: dict[str, Any],
        answered_by: str,
        owner: str = "",
    ) -> tuple[AnswerOutcome, AnswerResult]:
        """Answer an open input request: the first answer wins (see storage/waiting.py). The
        same answer id again gets ALREADY_ANSWERED; anything else that cannot win is an error
        saying why (FAILED_PRECONDITION naming the winner, the expiry or the ended operation)."""
        by = check_answer_fields(
            request_id, answer_id, answered_by, answer, self.config.max_input_bytes
        )
        op_id = await self._owned(operation_id, owner)
        stored = await self.storage.input_request(op_id, request_id)
        if stored is None:
            await self.get(op_id)  # an unknown operation says so first
            raise NotFound(f"operation {op_id} has no input request {shown(request_id)}")
        if stored.outcome == "open":
            waiting.check_answer(stored, answer)
        result = await self.storage.answer(op_id, request_id, answer_id, answer, by)
        if result is None:
            raise NotFound(f"operation {op_id} has no input request {shown(request_id)}")
        self.hub.publish(result.events)
        if result.events and result.operation.status is OperationStatus.PENDING:
            self.runner.submit(op_id)
        return waiting.answer_outcome(result, op_id, request_id, answer_id), result

    async def pause(self, operation_id: str, requested_by: str, owner: str = "") -> PauseResult:
        by = bounded_text(requested_by, "requested_by", MAX_REQUESTED_BY)
        op_id = await self._owned(operation_id, owner)
        here = self.runner.runs(op_id)  # then only this runner needs telling: Storage.pause
        result = await self.storage.pause(op_id, by, runner_here=here)
        if result is None:
            raise operation_not_found(op_id)
        self.hub.publish(result.events)
        if result.operation.pause_requested_at is not None:
            self.runner.deliver_pause(op_id)  # another replica's runner hears it notified
        return result

    async def resume(self, operation_id: str, requested_by: str, owner: str = "") -> ResumeResult:
        by = bounded_text(requested_by, "requested_by", MAX_REQUESTED_BY)
        op_id = await self._owned(operation_id, owner)
        result = await self.storage.resume(op_id, by)
        if result is None:
            raise operation_not_found(op_id)
        self.hub.publish(result.events)
        if result.events and result.operation.status is OperationStatus.PENDING:
            self.runner.submit(op_id)
        return result

    async def watch(self, operation_id: str, after_seq: int) -> AsyncGenerator[Event, None]:
        """Stored events after `after_seq`, then live ones, until the terminal event."""
        batches = self.watch_batches(operation_id, after_seq)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    yield event

    def watch_batches(
        self, operation_id: str, after_seq: int
    ) -> AsyncGenerator[Sequence[Event], None]:
        """What `watch` yields, grouped as ready together (see watching.py)."""
        return self.watches.batches(operation_id, after_seq)


def _log_stop(
    op_id: str | None,
    outcome: InterruptOutcome | None,
    cause: StopCause,
    requested_by: str,
    key: bool = False,
) -> None:
    """A stop recorded (or found recorded): its line, with what it did."""
    log.info(
        "stop requested",
        extra=logs.fields(
            operation_id=op_id,
            outcome=outcome.value if outcome is not None else "RECORDED_AHEAD",
            cause=stop_causes.label(cause),
            requested_by=requested_by,
            by_key=key,
        ),
    )
