"""The start use case: validate a start, create the operation (claimed for this replica's runner
in the same write when it can run here at once), hand it to the runner, and release a held one.
OperationsService (operations.py) is made of it and the other use cases.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from runtime_service.agents.registry import AgentRegistry
from runtime_service.caller_input import (
    MAX_IDEMPOTENCY_KEY,
    bounded_text,
    check_agent_input,
    check_hold,
    check_labels,
    checked_deadline,
    checked_max_steps,
)
from runtime_service.config import RuntimeConfig
from runtime_service.domain import Event, Operation
from runtime_service.hub import EventHub
from runtime_service.runner import Runner
from runtime_service.storage import ClaimFor, Created, Storage
from runtime_service.watching import Watches
from stopline import tracing
from stopline.ids import parse_operation_id
from stopline.limits import MAX_OWNER


@dataclass(frozen=True)
class StartArgs:
    """A start as the caller asked for it (validated by OperationsService). `deadline_seconds`
    None and `max_steps` 0: the configured defaults."""

    agent_name: str
    input_value: dict[str, Any]
    idempotency_key: str
    labels: Mapping[str, str] | None = None
    hold_seconds: float = 0.0
    owner: str = ""
    deadline_seconds: float | None = None
    max_steps: int = 0
    # The key is the caller's alone: no stop by it can come ahead of the start (Storage.create).
    key_private: bool = False


class Starting:
    """Composed into OperationsService, which gives it these and `get`."""

    config: RuntimeConfig
    storage: Storage
    agents: AgentRegistry
    hub: EventHub
    runner: Runner
    watches: Watches

    async def get(self, operation_id: str) -> Operation:
        raise NotImplementedError  # OperationsService

    async def _create(self, args: StartArgs) -> Created:
        """Validate, then store the operation (and apply a stop recorded ahead by its key)."""
        check_agent_input(
            self.agents, args.agent_name, args.input_value, self.config.max_input_bytes
        )
        key = bounded_text(args.idempotency_key, "idempotency_key", MAX_IDEMPOTENCY_KEY) or None
        checked_labels = check_labels(args.labels or {})
        checked_owner = bounded_text(args.owner, "owner", MAX_OWNER)
        check_hold(args.hold_seconds)
        deadline_seconds = checked_deadline(self.config, args.deadline_seconds)
        budget = checked_max_steps(self.config, args.max_steps)
        # Other replicas hear of the new work only if this one cannot run it now.
        announce = not self.runner.has_room
        # One that can run here at once, and that no stop by key can be ahead of, is claimed in
        # its create's own write (its run reserved first, under the id it is created with).
        claim = None
        if not args.hold_seconds and (key is None or args.key_private):
            reserved = self.runner.reserve()
            if reserved is not None:
                claim = ClaimFor(self.runner.runner_id, self.config.lease_seconds, reserved)
        create = self.storage.create(
            args.agent_name,
            args.input_value,
            key,
            checked_labels,
            args.hold_seconds,
            checked_owner,
            announce and claim is None,
            deadline_seconds=deadline_seconds,
            max_steps=budget,
            trace_parent=tracing.current_traceparent(),
            key_private=args.key_private,
            claim_for=claim,
        )
        if claim is None:
            return await create
        return await self._create_claimed(create, claim.operation_id)

    async def _create_claimed(self, create: Coroutine[Any, Any, Created], op_id: str) -> Created:
        """A create that claims for this runner (its slot reserved under `op_id`): the slot is
        given back as the write lands, unless it claimed (its callback runs before the caller
        resumes). A caller cancelled meanwhile leaves the write to land, and what it claimed is
        run then, not left claimed and idle until its lease lapses."""
        write = asyncio.ensure_future(create)
        write.add_done_callback(partial(self._claimed_nothing, op_id))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(self._landed_unawaited)
            raise

    def _claimed_nothing(self, op_id: str, write: asyncio.Future[Created]) -> None:
        if _claimed(write) is None:
            self.runner.adopt(op_id, None)

    def _landed_unawaited(self, write: asyncio.Future[Created]) -> None:
        created = _claimed(write)
        if created is not None:
            self._launch(created, 0.0)  # only an unheld start is claimed in its create

    async def start(
        self,
        agent_name: str,
        input_value: dict[str, Any],
        idempotency_key: str,
        labels: Mapping[str, str] | None = None,
        hold_seconds: float = 0.0,
        owner: str = "",
        deadline_seconds: float | None = None,
        max_steps: int = 0,
    ) -> Created:
        """`deadline_seconds` None and `max_steps` 0: the configured defaults."""
        return await self.start_with(
            StartArgs(
                agent_name,
                input_value,
                idempotency_key,
                labels,
                hold_seconds,
                owner,
                deadline_seconds,
                max_steps,
            )
        )

    async def start_with(self, args: StartArgs) -> Created:
        created = await self._create(args)
        self._launch(created, args.hold_seconds)
        return created

    async def start_and_watch(
        self, args: StartArgs
    ) -> AsyncGenerator[Created | Sequence[Event], None]:
        """A start, then its events from seq 1 in batches, as `watch_batches` gives them: the
        start's answer first, then the batches. A new operation's watch subscribes before the
        operation can run (Watches.from_start): its first step's events come live, with no read
        of storage on the way, also when it runs only once a release lets it (a held start)."""
        created = await self._create(args)
        launched = False

        def launch() -> None:
            nonlocal launched
            launched = True
            self._launch(created, args.hold_seconds)

        try:
            yield created
            if created.created:
                batches = self.watches.from_start(created.events, launch)
            else:
                batches = self.watches.batches(created.operation.id, 0)
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    yield batch
        finally:
            if created.claimed is not None and not launched:
                # Its caller left before watching: claimed here already, it runs all the same.
                launch()

    def _launch(self, created: Created, hold_seconds: float) -> None:
        """Publish a start's events and, when it may run now, hand it to the runner."""
        self.hub.publish(created.events)
        if created.claimed is not None:
            self.runner.adopt(created.operation.id, created.claimed)
        elif created.created and not hold_seconds and not created.operation.status.is_terminal:
            self.runner.submit(created.operation.id)

    async def release(self, operation_id: str) -> Operation:
        op_id = parse_operation_id(operation_id)
        running = self.runner.release(op_id)
        if running is not None:
            # Released and claimed here in one write, its first step begun.
            claimed = await running
            return claimed if claimed is not None else await self.get(op_id)
        announce = not self.runner.has_room  # as in start
        released = await self.storage.release(op_id, announce)
        if released is not None:
            self.runner.submit(op_id)
            return released
        return await self.get(op_id)  # not held (or unknown: NOT_FOUND)


def _claimed(write: asyncio.Future[Created]) -> Created | None:
    """The create's outcome when it landed and claimed, else None (failed or claimed nothing)."""
    if write.cancelled() or write.exception() is not None or write.result().claimed is None:
        return None
    return write.result()
