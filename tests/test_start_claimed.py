"""A start that can run on its own replica at once (unheld, a runner slot free, and no stop by key
possibly ahead of it: no key, or a private one) is claimed in its create's own write, with its
first step begun: one write before the first step instead of two (on PostgreSQL one round trip
fewer). Its run is registered before that write, under the id the operation is created with, so
a stop that lands meanwhile reaches it as it reaches a claim in flight."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from runtime_service.app import RuntimeApp
from runtime_service.domain import EventKind, InterruptOutcome, OperationStatus
from runtime_service.starts import StartArgs
from runtime_service.storage import ClaimFor, Created, Storage
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config

RUNNER = "runner-here"


def claim(operation_id: str | None = None) -> ClaimFor:
    return ClaimFor(RUNNER, 30.0, operation_id or str(uuid.uuid4()))


async def test_a_claimed_create_writes_the_claim_and_the_first_step_with_it(
    storage: Storage,
) -> None:
    wanted = claim()
    created = await storage.create("gated", {}, None, claim_for=wanted)
    op_id = created.operation.id
    assert op_id == wanted.operation_id
    assert created.claimed is not None
    claimed, begun = created.claimed
    assert created.operation.status is OperationStatus.RUNNING
    assert [e.kind for e in created.events] == [EventKind.CREATED]
    assert (claimed.event.kind, claimed.event.seq) == (EventKind.STARTED, 2)
    assert (begun.kind, begun.seq, begun.data) == (
        EventKind.STEP_STARTED,
        3,
        {"step": 0, "attempt": 1},
    )
    stored = await storage.events_after(op_id, 0)
    assert [(e.seq, e.kind) for e in stored] == [
        (1, EventKind.CREATED),
        (2, EventKind.STARTED),
        (3, EventKind.STEP_STARTED),
    ]
    assert [(r.step, r.attempt, r.runner_id) for r in await storage.step_records(op_id)] == [
        (0, 1, RUNNER)
    ]
    # Nobody else can claim it, and the step loop's next write is ours to make.
    assert await storage.claim_and_start(op_id, "someone-else", 30) is None
    assert (await storage.claim_next("someone-else", 10, 30)).claimed == []


async def test_only_an_unheld_start_that_no_stop_by_key_can_be_ahead_of_is_claimed(
    storage: Storage,
) -> None:
    held = await storage.create("gated", {}, None, hold_seconds=10, claim_for=claim())
    keyed = await storage.create("gated", {}, "the-clients", claim_for=claim())
    private = await storage.create("gated", {}, "mine", key_private=True, claim_for=claim())
    assert held.claimed is None and held.operation.status is OperationStatus.PENDING
    assert keyed.claimed is None and keyed.operation.status is OperationStatus.PENDING
    assert private.claimed is not None
    assert private.operation.status is OperationStatus.RUNNING
    # A repeated private key finds its twin, claims nothing, and leaves it as it was.
    again = await storage.create("gated", {}, "mine", key_private=True, claim_for=claim())
    assert not again.created and again.claimed is None
    assert again.operation.id == private.operation.id


async def test_a_start_through_the_use_case_runs_claimed_with_no_claim_of_its_own(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    created = await app.operations.start("gated", {}, "")
    op_id = created.operation.id
    assert created.claimed is not None  # the create claimed it
    assert app.runner.runs(op_id)
    await eventually(lambda: _started(gated, op_id))
    gated.open(op_id)
    await app.runner.wait_finished(op_id)
    operation = await app.operations.get(op_id)
    assert operation.status is OperationStatus.COMPLETED
    kinds = [e.kind for e in await app.storage.events_after(op_id, 0)]
    assert kinds[:4] == [
        EventKind.CREATED,
        EventKind.STARTED,
        EventKind.STEP_STARTED,
        EventKind.OUTPUT_CHUNK,
    ]
    assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.STEP_STARTED) == 1


async def test_a_stop_that_lands_while_the_create_is_in_flight_reaches_its_run(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    """The window between the create's commit and the run's task: the stop is recorded by
    another call meanwhile. The reserved run hears it, so the step never runs (before the
    run was registered, the stop found no run here, and the step ran until a write or a lease
    renewal found the stop in storage)."""
    runner = app.runner
    op_id = runner.reserve()
    assert op_id is not None and runner.runs(op_id)
    created = await app.storage.create(
        "gated", {}, None, claim_for=ClaimFor(runner.runner_id, 30.0, op_id)
    )
    assert created.claimed is not None
    stopped = await app.operations.interrupt(op_id, "test", "while starting")
    assert stopped.outcome is InterruptOutcome.ACCEPTED
    runner.adopt(op_id, created.claimed)
    await runner.wait_finished(op_id)
    operation = await app.operations.get(op_id)
    assert operation.status is OperationStatus.INTERRUPTED
    assert gated.steps_started == []


async def test_a_reservation_holds_a_slot_until_it_is_adopted_or_given_back(
    db_url: str, gated: GatedAgent
) -> None:
    app = await RuntimeApp.open(runtime_config(db_url, max_running=1), registry(gated))
    try:
        runner = app.runner
        first = runner.reserve()
        assert first is not None and not runner.has_room and runner.reserve() is None
        runner.adopt(first, None)  # not claimed: the slot is free again
        assert runner.has_room and not runner.runs(first)
        # A start while the only slot is reserved is not claimed by its create.
        second = runner.reserve()
        assert second is not None
        waiting = await app.operations.start("gated", {}, "")
        assert waiting.claimed is None
        assert waiting.operation.status is OperationStatus.PENDING
        runner.adopt(second, None)
        await eventually(lambda: _started(gated, waiting.operation.id))
        gated.open(waiting.operation.id)
        await runner.wait_finished(waiting.operation.id)
    finally:
        await app.close()


async def test_a_caller_that_leaves_before_watching_leaves_its_start_running(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    """The start's answer is out, and its caller goes before the watch begins: the operation,
    claimed here already, is run at once (not left claimed and idle until its lease lapses)."""
    watch = app.operations.start_and_watch(StartArgs("gated", {}, ""))
    answer = await anext(watch)
    assert isinstance(answer, Created) and answer.claimed is not None
    op_id = answer.operation.id
    await watch.aclose()
    assert app.runner.runs(op_id)
    await eventually(lambda: _started(gated, op_id))
    gated.open(op_id)
    await app.runner.wait_finished(op_id)
    assert (await app.operations.get(op_id)).status is OperationStatus.COMPLETED


async def _started(gated: GatedAgent, op_id: str) -> bool:
    return any(started == op_id for started, _ in gated.steps_started)


async def test_a_start_cancelled_while_its_claiming_write_is_in_flight_still_runs_once_it_lands(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    """The caller goes away while the create that claims for this runner is still being
    written (a PostgreSQL batch in flight; the write itself goes on). What the write claimed is
    run as it lands, by the claim it made: one `started`, not resumed. Left alone, it sat
    claimed and idle until its lease lapsed, and a takeover then resumed it."""
    entered, gate = asyncio.Event(), asyncio.Event()
    create = app.storage.create

    async def slow_create(*args: Any, **kwargs: Any) -> Created:
        assert kwargs["claim_for"] is not None
        entered.set()
        await gate.wait()
        return await create(*args, **kwargs)

    app.storage.create = slow_create  # type: ignore[method-assign]
    start = asyncio.ensure_future(app.operations.start("gated", {}, ""))
    await entered.wait()
    start.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await start
    gate.set()
    op_id = await eventually(lambda: _first_started(gated))
    gated.open(op_id)
    await app.runner.wait_finished(op_id)
    events = await app.storage.events_after(op_id, 0)
    started = [e for e in events if e.kind is EventKind.STARTED]
    assert [e.data["resumed"] for e in started] == [False]
    assert (await app.operations.get(op_id)).status is OperationStatus.COMPLETED


async def _first_started(gated: GatedAgent) -> str | None:
    return gated.steps_started[0][0] if gated.steps_started else None
