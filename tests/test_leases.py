"""Ownership of running operations: leases, fencing, claiming and takeover, on both backends."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from runtime_service.database import create_db_engine
from runtime_service.domain import EventKind, OperationStatus
from runtime_service.migrate import upgrade_to_head
from runtime_service.schema import operations
from runtime_service.store import OperationStore, utcnow


def wait_until_lease_lapses(store: OperationStore, op_id: str, deadline: float = 10) -> None:
    end = time.monotonic() + deadline
    while True:
        with store.engine.connect() as conn:
            expires = conn.execute(
                select(operations.c.lease_expires_at).where(operations.c.id == op_id)
            ).scalar_one()
        if expires is not None and expires <= utcnow():
            return
        assert time.monotonic() < end, "lease never lapsed"
        time.sleep(0.02)


def test_writes_are_fenced_to_the_owner(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    assert store.claim(op.id, "A", 30) is not None
    assert store.claim(op.id, "B", 30) is None  # already taken
    assert store.start_step(op.id, 0, "B") is None
    assert store.append_chunk(op.id, 0, "x", "B") is None
    assert store.complete_step(op.id, 0, 1, None, True, "B") == []
    assert store.finish_failed(op.id, 0, "no", "B") is None
    assert store.start_step(op.id, 0, "A") is not None
    assert [e.kind for e in store.complete_step(op.id, 0, 1, None, True, "A")] == [
        EventKind.STEP_COMPLETED,
        EventKind.COMPLETED,
    ]


def test_expired_lease_is_taken_over_and_the_old_owner_is_locked_out(store: OperationStore) -> None:
    op = store.create("ticker", {}, None).operation
    store.claim(op.id, "A", 0.2)
    store.start_step(op.id, 0, "A")
    store.complete_step(op.id, 0, "s0", {"n": 1}, False, "A")
    store.start_step(op.id, 1, "A")  # A dies in step 1
    assert store.claim_next("B", 10, 30).claimed == []  # A's lease is still valid
    wait_until_lease_lapses(store, op.id)
    batch = store.claim_next("B", 10, 30)
    assert [c.operation.id for c in batch.claimed] == [op.id]
    taken = batch.claimed[0]
    assert taken.event.data == {"from_step": 1, "resumed": True}
    assert taken.operation.agent_state == {"n": 1}
    assert store.append_chunk(op.id, 1, "late", "A") is None  # A wakes up: refused
    assert store.start_step(op.id, 1, "B") is not None
    kept, _ = store.renew_leases("A", [op.id], 30)
    assert kept == set()
    kept, _ = store.renew_leases("B", [op.id], 30)
    assert kept == {op.id}


def test_stop_recorded_while_owner_was_dead_ends_it_without_resuming(store: OperationStore) -> None:
    op = store.create("ticker", {}, None).operation
    store.claim(op.id, "A", 0.2)
    store.start_step(op.id, 0, "A")
    result = store.record_stop(op.id, "user", "while A was dead")
    assert result is not None and result.outcome.value == "ACCEPTED"
    _, stopping = store.renew_leases("A", [op.id], 0.2)
    assert stopping == {op.id}  # the fallback check a live owner would act on
    wait_until_lease_lapses(store, op.id)
    batch = store.claim_next("B", 10, 30)
    assert batch.claimed == []
    assert [e.kind for e in batch.finished] == [EventKind.INTERRUPTED]
    stored = store.get(op.id)
    assert stored is not None and stored.status is OperationStatus.INTERRUPTED
    kinds = [e.kind for e in store.events_after(op.id, 0)]
    assert kinds.count(EventKind.STARTED) == 1  # never resumed


def test_stop_while_the_owner_is_dead_mid_step_halts_it_mid_step(store: OperationStore) -> None:
    op = store.create("ticker", {}, None).operation
    store.claim(op.id, "A", 0.2)
    store.start_step(op.id, 0, "A")
    store.complete_step(op.id, 0, "s0", {"n": 1}, False, "A")
    store.start_step(op.id, 1, "A")  # A dies in step 1
    store.record_stop(op.id, "user", "while A was dead")
    wait_until_lease_lapses(store, op.id)
    [halted] = store.claim_next("B", 10, 30).finished
    assert halted.kind is EventKind.INTERRUPTED
    assert halted.data["mid_step"] is True and halted.data["step"] == 1
    records = store.step_records(op.id)
    assert [(r.step, r.attempt, r.outcome) for r in records] == [
        (0, 1, "completed"),
        (1, 1, "abandoned"),
    ]
    assert records[1].finished_at == halted.created_at


def test_stop_while_the_owner_is_dead_between_steps_halts_it_at_the_boundary(
    store: OperationStore,
) -> None:
    op = store.create("ticker", {}, None).operation
    store.claim(op.id, "A", 0.2)
    store.start_step(op.id, 0, "A")
    store.complete_step(op.id, 0, "s0", {"n": 1}, False, "A")  # A dies before step 1 begins
    store.record_stop(op.id, "user", "while A was dead")
    wait_until_lease_lapses(store, op.id)
    [halted] = store.claim_next("B", 10, 30).finished
    assert halted.data["mid_step"] is False and halted.data["step"] == 1
    assert [r.outcome for r in store.step_records(op.id)] == ["completed"]


def test_takeover_settles_the_dead_owners_attempt_before_the_new_one(
    store: OperationStore,
) -> None:
    op = store.create("ticker", {}, None).operation
    store.claim(op.id, "A", 0.2)
    store.start_step(op.id, 0, "A")  # A dies (or stalls) in step 0
    wait_until_lease_lapses(store, op.id)
    [taken] = store.claim_next("B", 10, 30).claimed
    records = store.step_records(op.id)
    assert [(r.step, r.attempt, r.outcome) for r in records] == [(0, 1, "abandoned")]
    assert records[0].finished_at == taken.event.created_at
    began = store.start_step(op.id, 0, "B")
    assert began is not None and began.data["attempt"] == 2
    # A wakes up and fails its step: refused, and B's attempt is not A's to settle.
    assert store.finish_failed(op.id, 0, "late", "A") is None
    assert [r.outcome for r in store.step_records(op.id)] == ["abandoned", None]
    store.complete_step(op.id, 0, "s0", {"n": 1}, True, "B")
    assert [r.outcome for r in store.step_records(op.id)] == ["abandoned", "completed"]


def test_held_operation_is_not_claimable_until_released(store: OperationStore) -> None:
    op = store.create("echo", {}, None, hold_seconds=30).operation
    assert store.claim_next("A", 10, 30).claimed == []
    assert store.claim(op.id, "A", 30) is None
    assert store.release(op.id)
    assert not store.release(op.id)
    assert [c.operation.id for c in store.claim_next("A", 10, 30).claimed] == [op.id]


def test_graceful_handoff_makes_operations_claimable_at_once(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    store.claim(op.id, "A", 300)
    assert store.drop_leases("A") == 1
    assert [c.operation.id for c in store.claim_next("B", 10, 30).claimed] == [op.id]


@pytest.mark.postgres
def test_concurrent_claimers_never_take_the_same_operation(postgres_url: str) -> None:
    engine = create_db_engine(postgres_url)
    upgrade_to_head(engine)
    store = OperationStore(engine)
    try:
        ids = {store.create("echo", {"i": i}, None).operation.id for i in range(120)}

        def claimer(name: str) -> list[str]:
            taken: list[str] = []
            while True:
                batch = store.claim_next(name, 7, 30)
                if not batch.claimed:
                    return taken
                taken += [c.operation.id for c in batch.claimed]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(claimer, ["A", "B", "C", "D"]))
        everything = [op_id for taken in results for op_id in taken]
        assert len(everything) == len(set(everything)) == len(ids)
        assert set(everything) == ids
        assert sum(1 for taken in results if taken) >= 2  # they really competed
    finally:
        engine.dispose()
