"""Ownership of running operations: leases, fencing, claiming and takeover, on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from sqlalchemy import Engine, select

from runtime_service.domain import EventKind, OperationStatus
from runtime_service.runner.leases import Leases
from runtime_service.runner.runs import RunnerSettings
from runtime_service.schema import operations
from runtime_service.storage import Storage, utcnow
from runtime_service.storage.shared import SharedStorage
from stopline.errors import Unavailable
from tests.conftest import opened_storage
from tests.test_store import running


async def wait_until_lease_lapses(storage: Storage, op_id: str, deadline: float = 10) -> None:
    assert isinstance(storage, SharedStorage)
    engine: Engine = storage.engine
    end = time.monotonic() + deadline
    while True:
        with engine.connect() as conn:
            expires = conn.execute(
                select(operations.c.lease_expires_at).where(operations.c.id == op_id)
            ).scalar_one()
        if expires is not None and expires <= utcnow():
            return
        assert time.monotonic() < end, "lease never lapsed"
        await asyncio.sleep(0.02)


async def test_writes_are_fenced_to_the_owner(storage: Storage) -> None:
    op_id = (await storage.create("echo", {}, None)).operation.id
    assert await storage.claim_and_start(op_id, "A", 30) is not None
    assert await storage.claim_and_start(op_id, "B", 30) is None  # already taken
    assert await storage.start_step(op_id, 0, "B") is None
    assert await storage.chunk(op_id, 0, "x", "B", False) is None
    assert await storage.complete(op_id, 0, 1, None, "B") == []
    assert await storage.advance(op_id, 0, 1, None, "B") == []
    assert await storage.fail(op_id, 0, "no", "B") is None
    assert await storage.halt(op_id, 0, False, "B") is None
    assert [e.kind for e in await storage.complete(op_id, 0, 1, None, "A")] == [
        EventKind.STEP_COMPLETED,
        EventKind.COMPLETED,
    ]


async def test_expired_lease_is_taken_over_and_the_old_owner_is_locked_out(
    storage: Storage,
) -> None:
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)
    await storage.advance(op_id, 0, "s0", {"n": 1}, "A")  # A dies in step 1
    assert (await storage.claim_next("B", 10, 30)).claimed == []  # A's lease is still valid
    await wait_until_lease_lapses(storage, op_id)
    batch = await storage.claim_next("B", 10, 30)
    assert [c.operation.id for c in batch.claimed] == [op_id]
    taken = batch.claimed[0]
    assert taken.event.data == {"from_step": 1, "resumed": True}
    assert taken.operation.agent_state == {"n": 1}
    assert await storage.chunk(op_id, 1, "late", "A", False) is None  # A wakes up: refused
    began = await storage.start_step(op_id, 1, "B")
    assert began is not None and began.data == {"step": 1, "attempt": 2}
    kept, _ = await storage.renew_leases("A", [op_id], 30)
    assert kept == set()
    kept, _ = await storage.renew_leases("B", [op_id], 30)
    assert kept == {op_id}


async def test_a_renewal_and_a_look_name_only_the_operations_with_a_stop_recorded(
    storage: Storage,
) -> None:
    # Each one it names, the runner reads back from storage (the fallback for a missed
    # notification): on SQLite 3.40 every renewal named every operation, a read per running
    # operation per lease interval.
    quiet, stopped = [(await storage.create("ticker", {}, None)).operation.id for _ in range(2)]
    for op_id in (quiet, stopped):
        await storage.claim_and_start(op_id, "A", 30)
    await storage.record_stop(stopped, "user", "enough")
    kept, stopping = await storage.renew_leases("A", [quiet, stopped], 30)
    assert kept == {quiet, stopped}
    assert stopping == {stopped}
    # The look between renewals finds the same, and only the runner's own.
    assert await storage.stored_intents("A") == {stopped}
    assert await storage.stored_intents("B") == set()


async def test_stop_recorded_while_owner_was_dead_ends_it_without_resuming(
    storage: Storage,
) -> None:
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)
    result = await storage.record_stop(op_id, "user", "while A was dead")
    assert result is not None and result.outcome.value == "ACCEPTED"
    _, stopping = await storage.renew_leases("A", [op_id], 0.2)
    assert stopping == {op_id}  # the fallback check a live owner would act on
    await wait_until_lease_lapses(storage, op_id)
    batch = await storage.claim_next("B", 10, 30)
    assert batch.claimed == []
    assert [e.kind for e in batch.finished] == [EventKind.INTERRUPTED]
    stored = await storage.get(op_id)
    assert stored is not None and stored.status is OperationStatus.INTERRUPTED
    kinds = [e.kind for e in await storage.events_after(op_id, 0)]
    assert kinds.count(EventKind.STARTED) == 1  # never resumed


async def test_stop_while_the_owner_is_dead_mid_step_halts_it_mid_step(storage: Storage) -> None:
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)
    await storage.advance(op_id, 0, "s0", {"n": 1}, "A")  # A dies in step 1
    await storage.record_stop(op_id, "user", "while A was dead")
    await wait_until_lease_lapses(storage, op_id)
    [halted] = (await storage.claim_next("B", 10, 30)).finished
    assert halted.kind is EventKind.INTERRUPTED
    assert halted.data["mid_step"] is True and halted.data["step"] == 1
    records = await storage.step_records(op_id)
    assert [(r.step, r.attempt, r.outcome) for r in records] == [
        (0, 1, "completed"),
        (1, 1, "abandoned"),
    ]
    assert records[1].finished_at == halted.created_at


async def test_stop_while_the_owner_is_dead_between_steps_halts_it_at_the_boundary(
    storage: Storage,
) -> None:
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)
    await storage.record_stop(op_id, "user", "while A ran step 0")
    # A checkpoints step 0 (the stop wins: step 1 never begins), then dies before halting.
    assert len(await storage.advance(op_id, 0, "s0", {"n": 1}, "A")) == 1
    await wait_until_lease_lapses(storage, op_id)
    [halted] = (await storage.claim_next("B", 10, 30)).finished
    assert halted.data["mid_step"] is False and halted.data["step"] == 1
    assert [r.outcome for r in await storage.step_records(op_id)] == ["completed"]


async def test_takeover_settles_the_dead_owners_attempt_before_the_new_one(
    storage: Storage,
) -> None:
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)  # A dies (or stalls) in step 0
    await wait_until_lease_lapses(storage, op_id)
    [taken] = (await storage.claim_next("B", 10, 30)).claimed
    records = await storage.step_records(op_id)
    assert [(r.step, r.attempt, r.outcome) for r in records] == [(0, 1, "abandoned")]
    assert records[0].finished_at == taken.event.created_at
    began = await storage.start_step(op_id, 0, "B")
    assert began is not None and began.data["attempt"] == 2
    # A wakes up and fails its step: refused, and B's attempt is not A's to settle.
    assert await storage.fail(op_id, 0, "late", "A") is None
    assert [r.outcome for r in await storage.step_records(op_id)] == ["abandoned", None]
    await storage.complete(op_id, 0, "s0", {"n": 1}, "B")
    assert [r.outcome for r in await storage.step_records(op_id)] == ["abandoned", "completed"]


async def test_held_operation_is_not_claimable_until_released(storage: Storage) -> None:
    op = (await storage.create("echo", {}, None, hold_seconds=30)).operation
    assert (await storage.claim_next("A", 10, 30)).claimed == []
    assert await storage.claim_and_start(op.id, "A", 30) is None
    released = await storage.release(op.id)
    assert released is not None and released.id == op.id and released.status.value == "PENDING"
    assert await storage.release(op.id) is None
    assert [c.operation.id for c in (await storage.claim_next("A", 10, 30)).claimed] == [op.id]
    assert await storage.release(op.id) is None  # running: nothing to release


async def test_graceful_handoff_makes_operations_claimable_at_once(storage: Storage) -> None:
    op_id = await running(storage, "A")
    assert await storage.drop_leases("A") == 1
    assert [c.operation.id for c in (await storage.claim_next("B", 10, 30)).claimed] == [op_id]


@pytest.mark.postgres
async def test_concurrent_claimers_never_take_the_same_operation(postgres_url: str) -> None:
    storages = [await opened_storage(postgres_url) for _ in range(4)]
    try:
        ids = {(await storages[0].create("echo", {"i": i}, None)).operation.id for i in range(120)}

        async def claimer(storage: Storage, name: str) -> list[str]:
            taken: list[str] = []
            while True:
                batch = await storage.claim_next(name, 7, 30)
                if not batch.claimed:
                    return taken
                taken += [c.operation.id for c in batch.claimed]

        results = await asyncio.gather(
            *(claimer(s, name) for s, name in zip(storages, "ABCD", strict=True))
        )
        everything = [op_id for taken in results for op_id in taken]
        assert len(everything) == len(set(everything)) == len(ids)
        assert set(everything) == ids
        assert sum(1 for taken in results if taken) >= 2  # they really competed
    finally:
        for storage in storages:
            await storage.close()


async def test_a_runner_never_claims_again_what_it_is_running(storage: Storage) -> None:
    """A runner whose event loop stalled past its lease must not claim its own operation again:
    its writes are fenced by runner id only, so a second claim would run the operation twice in
    one process (seen as two `started` events and a tool call left unsettled)."""
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)
    await wait_until_lease_lapses(storage, op_id)
    assert (await storage.claim_next("A", 10, 30, running=[op_id])).claimed == []
    kept, _ = await storage.renew_leases("A", [op_id], 30)  # its lease loop renews it instead
    assert kept == {op_id}
    assert (await storage.claim_next("B", 10, 30)).claimed == []


async def test_a_failed_renewal_is_tried_again_at_the_next_poll_not_a_lease_third_later() -> None:
    # Renewals come a third of the way through the lease (10 s here); one that fails must not
    # wait that long again, or two failures in a row would let the lease lapse.
    calls: list[float] = []
    retried = asyncio.Event()

    class FlakyStorage:
        async def renew_leases(
            self, runner_id: str, ids: list[str], lease_seconds: float
        ) -> tuple[set[str], set[str]]:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise Unavailable("the database blinked")
            retried.set()
            return set(ids), set()

        async def stored_intents(self, runner_id: str) -> set[str]:
            return set()

    settings = RunnerSettings(
        "r", stop_grace=0.1, max_running=1, lease_seconds=30, poll_seconds=0.05
    )
    leases = Leases(
        FlakyStorage(),  # type: ignore[arg-type]
        settings,
        {},
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        lambda op_id, claimed: None,
        lambda op_id: True,
        lambda op_id: True,
    )
    loop_task = asyncio.create_task(leases.lease_loop())
    try:
        deadline = time.monotonic() + 5
        while not calls:  # a renewal now, which fails (a wake before the loop waits is lost)
            leases.check_stops_now()
            await asyncio.sleep(0.01)
            assert time.monotonic() < deadline
        await asyncio.wait_for(retried.wait(), timeout=5)  # not 10 s later
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
    assert len(calls) == 2
