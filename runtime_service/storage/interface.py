"""What the runtime asks of storage: one interface, one implementation per SQL dialect.

The runner and the use cases call these methods and nothing else; neither knows which database
runs them. The implementation is chosen once, when the app is built (see open_storage).

Invariants every implementation keeps:
- Every state change is a conditional UPDATE of the operation row (compare-and-set): it names
  the statuses it may leave, so two racing writers (a stop and a completing step) cannot both win.
- The same UPDATE bumps `last_seq`, and the events it reports are inserted with those seqs in the
  same transaction: the event sequence is gap-free and never disagrees with the stored state.
- Step writes never touch the stop-intent columns, and the stop write touches nothing but them
  (and the status, for an operation that never started), so neither can overwrite the other.
- Every runner write is fenced: it applies only while the operation is RUNNING under that runner.
- Once a stop is recorded, no output is stored and no step begins (the stop wins at a boundary).
- Each write's result is returned only after it has committed (writers publish its events then).

Storage failures leave this interface as domain errors: `stopline.errors.Unavailable` when the
database cannot be reached (a retry can succeed), `StorageError` otherwise (a bug).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from runtime_service.domain import (
    AnswerResult,
    Event,
    EventKind,
    InterruptResult,
    JSONValue,
    Operation,
    PauseResult,
    RecordedAhead,
    ResumeResult,
    StopCause,
    StoredRequest,
)
from runtime_service.metrics import UnfinishedCounts


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Keyset position: the last (created_at, id) of the previous page, newest first."""

    created_at: datetime
    id: str


Tombstone = tuple[str, str, StopCause]
"""A stop recorded by key ahead of its start: (requested_by, reason, cause)."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """An operation a runner now owns, with the event announcing it."""

    operation: Operation
    event: Event
    # Tool calls the dead owner left open, settled `tool_call_outcome_unknown` by the takeover
    # (after `event`, before the step runs again).
    settled: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimFor:
    """A start's claim for the runner of the replica that creates it (Storage.create)."""

    runner_id: str
    lease_seconds: float
    # The id the new operation gets: its run is registered under it before the create's write
    # (Runner.reserve), so that a stop that lands meanwhile reaches it.
    operation_id: str


@dataclass(frozen=True, slots=True)
class Created:
    operation: Operation
    created: bool
    events: tuple[Event, ...]
    # Claimed in the create's own write (Storage.create's `claim_for`), with its first step's
    # step_started (not in `events`, which end at the create's).
    claimed: tuple[Claimed, Event] | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """An event a runner appended mid-step, and whether a stop was recorded by then (a record
    allowed after the stop tells its runner of the stop this way)."""

    event: Event
    stopping: bool


@dataclass(frozen=True, slots=True)
class KeptState:
    """The state a step kept for a stop (StepContext.keep_on_stop), stored by the halt."""

    state: JSONValue


@dataclass(frozen=True, slots=True)
class NewRequest:
    """An input request a step ends with, as the runner hands it to storage: `data` is its
    input_requested event's data; `default` the answer an expiry gives."""

    request_id: str
    kind: str
    prompt: str
    data: dict[str, JSONValue]
    schema: dict[str, Any] | None
    default: dict[str, JSONValue]
    expires_at: datetime


@dataclass
class ClaimBatch:
    claimed: list[Claimed] = field(default_factory=list)
    # Orphans that were stopped while their owner was dead, ended here without resuming.
    finished: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One attempt at a step: when and by which runner it ran, and how it ended."""

    step: int
    attempt: int
    runner_id: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    output_json: str | None


@dataclass(frozen=True, slots=True)
class ExpiredBatch:
    """What one batch of retention did: operations it newly marked expired, and the events and
    step records it deleted (of those, or of operations marked by an earlier batch)."""

    operations: int = 0
    events: int = 0
    steps: int = 0

    @property
    def empty(self) -> bool:
        """Nothing was left to do: the retention pass is over."""
        return not (self.operations or self.events or self.steps)


class Storage(Protocol):
    """Operations, their events and their step attempts. Every method is a coroutine."""

    @property
    def dialect(self) -> str:
        """The database's SQL dialect, for logs."""
        ...

    # -- starting and stopping (the use cases)

    async def create(
        self,
        agent: str,
        input_value: JSONValue,
        idempotency_key: str | None,
        labels: Mapping[str, str] | None = None,
        hold_seconds: float = 0.0,
        owner: str = "",
        announce: bool = True,
        deadline_seconds: float | None = None,
        max_steps: int | None = None,
        trace_parent: str | None = None,
        key_private: bool = False,
        claim_for: ClaimFor | None = None,
    ) -> Created:
        """Insert a PENDING operation and its `created` event, or find the owner's idempotent
        twin (AlreadyExists if the key was used for a different request). `announce`: tell
        other replicas there is work (not needed when this one runs it right away).
        `deadline_seconds` is stored as the absolute `deadline_at` (creation time + it).
        `trace_parent`: the start's W3C traceparent, which the operation's runs continue.
        A live tombstone of the owner's key (a stop by key stored before the start) is applied
        here: the operation comes back INTERRUPTED, with its stop's events, and no step. The
        tombstone is taken in the same write as the stop, so a stop that fails to commit leaves
        it for the start's retry (which finds its twin PENDING and applies it). It is looked
        for after the create committed (see record_stop_by_key for why after), as of the
        create's own time, so a tombstone that expires meanwhile still applies; a create that
        sees it in its own write creates the operation held (stopped_ahead_hold), whatever
        `hold_seconds` says, so that no runner claims it before its stop. `key_private`: the
        key is the caller's alone (a gateway's retry key), so no stop by it can be stored ahead:
        no tombstone is looked for or applied (on PostgreSQL, one round trip fewer).
        `claim_for`: an unheld start that can run on the caller's runner at once, and that no
        stop by key can be ahead of (no key, or a private one): a new operation is claimed for
        that runner with its first step begun in the create's own write, as claim_and_start
        would (`Created.claimed`), rather than in a write of its own after it."""
        ...

    async def release(self, operation_id: str, announce: bool = True) -> Operation | None:
        """End a hold: the operation is claimable now. None when it was not held (unknown,
        released already, or ended)."""
        ...

    async def record_stop(
        self,
        operation_id: str,
        requested_by: str,
        reason: str,
        cause: StopCause = StopCause.OPERATOR,
        owner: str = "",
        runner_here: bool = False,
    ) -> InterruptResult | None:
        """Store the stop intent once. A PENDING operation is interrupted right here, so no
        runner ever starts it. None for an unknown id, and for another owner's operation when
        `owner` is set (checked in the stop's own write, so a caller whose ownership nobody
        has checked yet costs no read before it).

        `runner_here`: the caller's own runner runs the operation and is told in-process, so
        the runners of other replicas are not notified (PostgreSQL's stops channel, which every
        replica hears: each would wake for a stop it has nothing to do with, on the machine
        that is halting the operation). Watchers elsewhere still get the stop's event. Should
        the operation change hands meanwhile, its new runner finds the stop in storage: at its
        claim, at its next step boundary or at its next lease renewal."""
        ...

    async def record_stop_by_key(
        self,
        owner: str,
        key: str,
        requested_by: str,
        reason: str,
        cause: StopCause,
        expires_seconds: float,
    ) -> InterruptResult | RecordedAhead:
        """A stop by the owner's idempotency key: recorded on the operation with that key, or,
        when there is none yet, stored as a tombstone for `expires_seconds` (RecordedAhead)."""
        ...

    # -- the runner's writes, all fenced to `runner_id`

    async def claim_and_start(
        self, operation_id: str, runner_id: str, lease_seconds: float, release: bool = False
    ) -> tuple[Claimed, Event] | None:
        """Take a PENDING, unheld operation (started on this replica) and begin its first step:
        the claim and the `step_started` event. None when another runner took it first, it is
        held, or it was stopped. `release`: take it only if it is held, releasing it (a held
        start's release and claim in one write); None when it is not held (released already,
        unknown, or ended)."""
        ...

    async def start_step(self, operation_id: str, step: int, runner_id: str) -> Event | None:
        """Begin `step` (an attempt row and `step_started`); None when a stop is recorded or the
        operation is no longer this runner's."""
        ...

    async def append(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> Appended | None:
        """Append an event of the step in flight (output, a text delta, an agent event, a tool
        call record); None when the operation ended or changed hands, or a stop is recorded
        (unless `outlives_stop`: records allowed between the stop and the halt, e.g. settling
        a tool call, and everything in the stop-at-boundary mode)."""
        ...

    def append_soon(
        self,
        operation_id: str,
        kind: EventKind,
        data: dict[str, JSONValue],
        runner_id: str,
        outlives_stop: bool,
    ) -> asyncio.Future[Appended | None]:
        """`append`, made or queued before this returns, with no coroutine around it: the
        write lands whether or not its future is awaited (a cancelled caller does not take it
        back), and the future holds what `append` would return. What the runner's step uses:
        a task per event would cost the event loop more than the write itself."""
        ...

    async def chunk(
        self, operation_id: str, step: int, text: str, runner_id: str, outlives_stop: bool
    ) -> Event | None:
        """append() of an output chunk."""
        ...

    async def advance(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        """Checkpoint step `step` (not the last) and begin step + 1, in one transaction:
        [step_completed, step_started], or [step_completed] alone when a stop was recorded
        (the runner then halts at this boundary), or [] when no longer this runner's."""
        ...

    async def complete(
        self, operation_id: str, step: int, output: JSONValue, state: JSONValue, runner_id: str
    ) -> list[Event]:
        """Checkpoint the last step and complete the operation: [step_completed, completed],
        [step_completed] alone when a stop was recorded first (the stop wins), or []."""
        ...

    async def halt(
        self,
        operation_id: str,
        step: int,
        mid_step: bool,
        runner_id: str,
        seen_at: datetime | None = None,
        kept: KeptState | None = None,
    ) -> Event | None:
        """RUNNING -> INTERRUPTED after this runner halted. halt_ms (see halt_ms()) runs from
        the committed stop; `seen_at`: when this runner learned of it, if it did so at once;
        `kept`: the state the cut step kept for a stop (else the last checkpoint's stays)."""
        ...

    async def fail(self, operation_id: str, step: int, error: str, runner_id: str) -> Event | None:
        """RUNNING -> FAILED, settling the step's attempt as failed."""
        ...

    # -- waiting for a person (storage/waiting.py; pause and resume: storage/pausing.py)

    async def ask(
        self,
        operation_id: str,
        step: int,
        output: JSONValue,
        state: JSONValue,
        request: NewRequest,
        runner_id: str,
    ) -> list[Event]:
        """Checkpoint `step`, store its input request and leave the operation WAITING with no
        runner: [step_completed, input_requested] (+ paused when a pause was requested),
        [step_completed] alone when a stop was recorded (the runner halts), [] when not ours."""
        ...

    async def pause_halt(
        self, operation_id: str, step: int, mid_step: bool, runner_id: str
    ) -> Event | None:
        """RUNNING -> PAUSED after this runner cut its step for a pause; None when a stop won
        or the operation is no longer ours."""
        ...

    async def input_request(self, operation_id: str, request_id: str) -> StoredRequest | None: ...

    async def answer(
        self,
        operation_id: str,
        request_id: str,
        answer_id: str,
        answer: dict[str, JSONValue],
        answered_by: str,
    ) -> AnswerResult | None:
        """Resolve an open request once (first answer wins); None for an unknown request."""
        ...

    async def expire_requests(self, limit: int = 100) -> list[Event]:
        """Resolve open requests past their expiry with their defaults."""
        ...

    async def overdue_waiting(self, limit: int = 100) -> list[Operation]:
        """WAITING or PAUSED operations past their deadline with no stop recorded."""
        ...

    async def pause(
        self, operation_id: str, requested_by: str, runner_here: bool = False
    ) -> PauseResult | None:
        """`runner_here`: as for `record_stop`, the caller's runner runs the operation and is
        told in-process, so a pause of a RUNNING operation sends nothing on the stops channel."""
        ...

    async def resume(self, operation_id: str, requested_by: str) -> ResumeResult | None: ...

    # -- reads

    async def get(self, operation_id: str) -> Operation | None: ...

    async def events_after(
        self, operation_id: str, after_seq: int, limit: int = 1000
    ) -> list[Event]:
        """Up to `limit` stored events after `after_seq`, in order (replays read pages)."""
        ...

    async def list_page(
        self, status: str | None, limit: int, after: ListCursor | None, owner: str | None = None
    ) -> tuple[list[Operation], ListCursor | None]:
        """A page newest first, and the cursor of the next page (None at the end)."""
        ...

    async def step_records(self, operation_id: str) -> list[StepRecord]:
        """Every attempt at every step of an operation, for audits and tests."""
        ...

    # -- ownership

    async def claim_next(
        self,
        runner_id: str,
        limit: int,
        lease_seconds: float,
        running: Collection[str] = (),
    ) -> ClaimBatch:
        """Take up to `limit` claimable operations: PENDING unheld ones, and RUNNING ones whose
        owner's lease ran out (resumed from their last checkpoint, the dead owner's attempt
        settled as abandoned); a dead owner's operation with a stop recorded is halted.

        `running` are the operations this runner is running now. They are never claimed again
        here even when their lease lapsed (a stalled event loop): this runner's writes are
        fenced by its id only, so a second claim would run the same operation twice in one
        process; its lease loop renews them instead."""
        ...

    async def count_unfinished(self) -> UnfinishedCounts:
        """Operations not yet finished, by status, and how many are claimable now (the
        metrics): a count over the unfinished statuses only, which the status index bounds."""
        ...

    async def renew_leases(
        self, runner_id: str, operation_ids: list[str], lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        """Extend this runner's leases: (still owned, owned with a stop or a pause recorded)."""
        ...

    async def stored_intents(self, runner_id: str) -> set[str]:
        """This runner's running operations with a stop or a pause recorded: the look between
        two renewals for an intent whose notification was missed (it returns only those)."""
        ...

    async def drop_leases(self, runner_id: str) -> int:
        """Graceful shutdown: let other replicas take this runner's operations at once."""
        ...

    async def expire_all_leases(self) -> int:
        """Single-replica start-up: whoever ran these operations is gone."""
        ...

    # -- retention

    def retention_turn(self) -> AbstractAsyncContextManager[bool]:
        """Enter to expire events: True inside while this replica is the only one doing so
        (taken, and given back on exit); False when another replica is at it (skip this round).
        One database serves every replica, so only one of them deletes at a time."""
        ...

    async def expire_events(self, cutoff: datetime, batch_size: int) -> ExpiredBatch:
        """One batch of retention, one short transaction of at most `batch_size` rows: go on
        deleting the events and step records of operations already expired, or else expire
        the oldest operations that ended before `cutoff` (their `events_expired_at` is set in
        the transaction that deletes their first rows). The operation rows stay; an operation
        that has not ended is never touched. Call again until the batch is `empty`."""
        ...

    async def close(self) -> None: ...
