"""A held start's release: released and claimed by this replica's runner in one write, with its
first step begun, when the runner has room; released in storage for any replica otherwise. On
both backends, through storage and through the use case."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_service.app import RuntimeApp
from runtime_service.domain import EventKind, OperationStatus, StopCause
from runtime_service.storage import Storage
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config

STARTED = [EventKind.CREATED, EventKind.STARTED, EventKind.STEP_STARTED]


async def test_a_release_claims_only_a_held_operation_once(storage: Storage) -> None:
    held = (await storage.create("gated", {}, None, hold_seconds=60)).operation.id
    unheld = (await storage.create("gated", {}, None)).operation.id
    assert await storage.claim_and_start(unheld, "r", 30, release=True) is None
    assert await storage.claim_and_start(held, "r", 30) is None  # held: no plain claim

    taken = await storage.claim_and_start(held, "r", 30, release=True)
    assert taken is not None
    claimed, begun = taken
    assert claimed.operation.status is OperationStatus.RUNNING
    assert (begun.kind, begun.data["step"]) == (EventKind.STEP_STARTED, 0)
    assert [e.kind for e in await storage.events_after(held, 0)] == STARTED
    assert [(r.step, r.attempt) for r in await storage.step_records(held)] == [(0, 1)]
    # Released once: a second release, or a claim by anyone, finds nothing to take.
    assert await storage.claim_and_start(held, "r", 30, release=True) is None
    assert await storage.claim_and_start(held, "other", 30) is None
    assert await storage.release(held) is None


async def test_a_stopped_held_operation_is_not_released(storage: Storage) -> None:
    held = (await storage.create("gated", {}, None, hold_seconds=60)).operation.id
    assert await storage.record_stop(held, "me", "before the release", StopCause.USER)
    assert await storage.claim_and_start(held, "r", 30, release=True) is None
    operation = await storage.get(held)
    assert operation is not None and operation.status is OperationStatus.INTERRUPTED
    assert await storage.step_records(held) == []


@pytest.fixture
async def app(db_url: str, gated: GatedAgent) -> Any:
    runtime_app = await RuntimeApp.open(runtime_config(db_url), registry(gated))
    try:
        yield runtime_app
    finally:
        await runtime_app.close()


async def test_the_release_is_the_runs_first_write_when_the_runner_has_room(
    app: RuntimeApp, gated: GatedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No separate release write: the release call answers with the operation RUNNING, its
    first step begun (before, a release write, then the runner's claim)."""
    op_id = (await app.operations.start("gated", {}, "", hold_seconds=60)).operation.id

    async def no_separate_release(*args: Any) -> None:
        raise AssertionError("released by a write of its own")

    monkeypatch.setattr(app.storage, "release", no_separate_release)
    released = await app.operations.release(op_id)
    assert released.id == op_id and released.status is OperationStatus.RUNNING
    await eventually(lambda: _began(gated, op_id))
    assert [e.kind for e in await app.storage.events_after(op_id, 0)][:3] == STARTED
    # Not held any more: a second release answers with the operation as it is.
    monkeypatch.undo()
    again = await app.operations.release(op_id)
    assert again.status is OperationStatus.RUNNING
    gated.open(op_id)
    await app.runner.wait_finished(op_id)
    finished = await app.operations.get(op_id)
    assert finished.status is OperationStatus.COMPLETED


async def test_a_runner_without_room_releases_it_for_any_replica(
    db_url: str, gated: GatedAgent
) -> None:
    app = await RuntimeApp.open(runtime_config(db_url, max_running=1), registry(gated))
    try:
        busy = (await app.operations.start("gated", {}, "")).operation.id
        await eventually(lambda: _began(gated, busy))
        held = (await app.operations.start("gated", {}, "", hold_seconds=60)).operation.id
        released = await app.operations.release(held)
        assert released.status is OperationStatus.PENDING  # released, waiting for room
        gated.open(busy)
        await eventually(lambda: _began(gated, held))  # the freed slot takes it
        gated.open(held)
        await app.runner.wait_finished(held)
    finally:
        await app.close()


async def _began(gated: GatedAgent, op_id: str) -> bool:
    return any(op == op_id for op, _ in gated.steps_started)
