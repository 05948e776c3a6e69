"""Storage on its own, through the interface the runner and the use cases call, on both
backends: compare-and-set transitions, stop intent, gap-free events, fencing."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from runtime_service.domain import EventKind, InterruptOutcome, OperationStatus
from runtime_service.migrate import upgrade_to_head
from runtime_service.storage import Storage
from runtime_service.storage.sqlite_sql import RECORD_STOP_IDLE, RECORD_STOP_RUNNING
from stopline.errors import AlreadyExists


async def seqs(storage: Storage, op_id: str) -> list[int]:
    return [e.seq for e in await storage.events_after(op_id, 0)]


async def running(storage: Storage, runner: str = "r", agent: str = "echo") -> str:
    """A new operation, claimed by `runner` with its first step begun."""
    op_id = (await storage.create(agent, {}, None)).operation.id
    assert await storage.claim_and_start(op_id, runner, 60) is not None
    return op_id


async def test_create_writes_pending_operation_and_first_event(storage: Storage) -> None:
    created = await storage.create("echo", {"a": 1}, None)
    assert created.created
    assert created.operation.status is OperationStatus.PENDING
    assert [e.kind for e in created.events] == [EventKind.CREATED]
    assert created.operation.last_seq == 1 and await seqs(storage, created.operation.id) == [1]
    assert await storage.get(created.operation.id) == created.operation


async def test_idempotency_key_returns_same_operation_or_conflicts(storage: Storage) -> None:
    first = await storage.create("echo", {"a": 1}, "key-1")
    again = await storage.create("echo", {"a": 1}, "key-1")
    assert not again.created and again.operation.id == first.operation.id
    with pytest.raises(AlreadyExists, match="key-1"):
        await storage.create("echo", {"a": 2}, "key-1")
    with pytest.raises(AlreadyExists):
        await storage.create("ticker", {"a": 1}, "key-1")
    other_owner = await storage.create("echo", {"a": 2}, "key-1", owner="someone else")
    assert other_owner.created  # keys are scoped by owner
    assert await seqs(storage, first.operation.id) == [1]


async def test_claim_begins_the_first_step(storage: Storage) -> None:
    op_id = (await storage.create("echo", {}, None)).operation.id
    taken = await storage.claim_and_start(op_id, "r", 60)
    assert taken is not None
    claimed, begun = taken
    assert claimed.operation.status is OperationStatus.RUNNING
    assert (claimed.event.kind, claimed.event.data) == (
        EventKind.STARTED,
        {"from_step": 0, "resumed": False},
    )
    assert (begun.kind, begun.data) == (EventKind.STEP_STARTED, {"step": 0, "attempt": 1})
    assert await storage.events_after(op_id, 1) == [claimed.event, begun]
    assert [(r.step, r.attempt, r.outcome) for r in await storage.step_records(op_id)] == [
        (0, 1, None)
    ]
    assert await storage.claim_and_start(op_id, "other", 60) is None  # taken already


async def test_stop_of_pending_operation_interrupts_it_and_blocks_claim(storage: Storage) -> None:
    op = (await storage.create("echo", {}, None)).operation
    result = await storage.record_stop(op.id, "alice", "changed my mind")
    assert result is not None and result.outcome is InterruptOutcome.ACCEPTED
    assert result.operation.status is OperationStatus.INTERRUPTED
    assert [e.kind for e in result.events] == [EventKind.STOP_REQUESTED, EventKind.INTERRUPTED]
    assert result.events[1].data["mid_step"] is False
    assert await storage.events_after(op.id, 1) == list(result.events)
    assert await storage.claim_and_start(op.id, "runner", 10) is None
    assert await storage.start_step(op.id, 0, "runner") is None
    assert await storage.step_records(op.id) == []


async def test_stop_is_idempotent_and_never_changes_a_finished_operation(
    storage: Storage,
) -> None:
    op_id = await running(storage)
    await storage.complete(op_id, 0, "out", None, "r")
    before = await storage.get(op_id)
    assert before is not None and before.status is OperationStatus.COMPLETED
    for _ in range(2):
        result = await storage.record_stop(op_id, "bob", "late")
        assert result is not None and result.outcome is InterruptOutcome.ALREADY_FINISHED
        assert result.events == ()
    assert await storage.get(op_id) == before

    running_id = await running(storage)
    first = await storage.record_stop(running_id, "bob", "one")
    second = await storage.record_stop(running_id, "carol", "two")
    assert first is not None and first.outcome is InterruptOutcome.ACCEPTED
    assert [e.kind for e in first.events] == [EventKind.STOP_REQUESTED]
    assert second is not None and second.outcome is InterruptOutcome.ALREADY_REQUESTED
    stopped = await storage.get(running_id)
    assert stopped is not None and stopped.stop is not None
    assert stopped.stop.requested_by == "bob"  # the first stop is the one recorded
    assert await storage.record_stop("00000000-0000-0000-0000-000000000000", "x", "") is None


async def test_a_stop_with_an_owner_reaches_only_that_owners_operation(storage: Storage) -> None:
    """`owner` on a stop by id: checked in the stop's own write; anyone else's operation is
    answered like an unknown id (None) and left exactly as it was, running or finished."""
    op = (await storage.create("echo", {}, None, owner="alice")).operation
    assert await storage.claim_and_start(op.id, "r", 60) is not None
    before = await storage.get(op.id)
    assert await storage.record_stop(op.id, "mallory", "not yours", owner="mallory") is None
    assert await storage.get(op.id) == before
    stopped = await storage.record_stop(op.id, "alice", "mine", owner="alice")
    assert stopped is not None and stopped.outcome is InterruptOutcome.ACCEPTED
    assert [e.kind for e in stopped.events] == [EventKind.STOP_REQUESTED]
    # Stopped already: the owner hears so, anyone else still hears of no such operation.
    again = await storage.record_stop(op.id, "alice", "again", owner="alice")
    assert again is not None and again.outcome is InterruptOutcome.ALREADY_REQUESTED
    assert await storage.record_stop(op.id, "mallory", "again", owner="mallory") is None
    # No owner named (a direct call to the runtime): no check, as before.
    unowned = await storage.record_stop(op.id, "operator", "any")
    assert unowned is not None and unowned.outcome is InterruptOutcome.ALREADY_REQUESTED
    pending = (await storage.create("echo", {}, None, owner="alice")).operation
    assert await storage.record_stop(pending.id, "bob", "", owner="bob") is None
    still = await storage.get(pending.id)
    assert still is not None and still.status is OperationStatus.PENDING and still.stop is None


async def test_step_checkpoint_never_overwrites_stop_intent(storage: Storage) -> None:
    op_id = await running(storage)
    await storage.record_stop(op_id, "alice", "stop")
    written = await storage.complete(op_id, 0, "out", {"s": 1}, "r")
    # The step's checkpoint is kept, but completion is refused: the stop came first.
    assert [e.kind for e in written] == [EventKind.STEP_COMPLETED]
    after = await storage.get(op_id)
    assert after is not None
    assert after.status is OperationStatus.RUNNING and after.is_stopping
    assert after.stop is not None and after.stop.requested_by == "alice"
    assert after.steps_completed == 1 and after.agent_state == {"s": 1}
    # No further step may begin once a stop is recorded.
    assert await storage.start_step(op_id, 1, "r") is None
    final = await storage.halt(op_id, 1, False, "r")
    assert final is not None and final.kind is EventKind.INTERRUPTED
    assert final.data["halt_ms"] >= 0 and final.data["mid_step"] is False
    assert [r.outcome for r in await storage.step_records(op_id)] == ["completed"]


async def test_a_halt_mid_step_settles_the_attempt_as_interrupted(storage: Storage) -> None:
    op_id = await running(storage)
    await storage.record_stop(op_id, "alice", "stop")
    halted = await storage.halt(op_id, 0, True, "r")
    assert halted is not None and halted.data["mid_step"] is True and halted.data["step"] == 0
    assert [r.outcome for r in await storage.step_records(op_id)] == ["interrupted"]
    op = await storage.get(op_id)
    assert op is not None and op.status is OperationStatus.INTERRUPTED


async def test_no_output_is_stored_once_a_stop_is_recorded(storage: Storage) -> None:
    op_id = await running(storage)
    assert await storage.chunk(op_id, 0, "before", "r", False) is not None
    await storage.record_stop(op_id, "alice", "stop")
    assert await storage.chunk(op_id, 0, "after", "r", False) is None
    # The stop-at-boundary mode lets the step in flight finish, and keeps its output.
    kept = await storage.chunk(op_id, 0, "at-boundary mode", "r", True)
    assert kept is not None
    texts = [
        e.data["text"]
        for e in await storage.events_after(op_id, 0)
        if e.kind is EventKind.OUTPUT_CHUNK
    ]
    assert texts == ["before", "at-boundary mode"]


async def test_terminal_states_never_change(storage: Storage) -> None:
    op_id = await running(storage)
    failed = await storage.fail(op_id, 0, "boom", "r")
    assert failed is not None and failed.data == {"error": "boom", "step": 0}
    assert [r.outcome for r in await storage.step_records(op_id)] == ["failed"]
    snapshot = await storage.get(op_id)
    assert snapshot is not None and snapshot.status is OperationStatus.FAILED
    assert snapshot.error == "boom"
    assert await storage.halt(op_id, 0, True, "r") is None
    assert await storage.complete(op_id, 0, "x", None, "r") == []
    assert await storage.advance(op_id, 0, "x", None, "r") == []
    assert await storage.chunk(op_id, 0, "late output", "r", False) is None
    assert await storage.fail(op_id, 0, "again", "r") is None
    assert await storage.claim_and_start(op_id, "other", 10) is None
    assert await storage.get(op_id) == snapshot


async def test_event_sequence_is_gap_free(storage: Storage) -> None:
    op_id = await running(storage)
    for step in range(3):
        for i in range(4):
            await storage.chunk(op_id, step, f"{step}.{i}", "r", False)
        if step < 2:
            await storage.advance(op_id, step, step, {"n": step}, "r")
        else:
            await storage.complete(op_id, step, step, {"n": step}, "r")
    events = await storage.events_after(op_id, 0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind is EventKind.COMPLETED
    assert [e.seq for e in await storage.events_after(op_id, 5)] == list(range(6, len(events) + 1))
    assert [e.seq for e in await storage.events_after(op_id, 5, limit=2)] == [6, 7]
    operation = await storage.get(op_id)
    assert operation is not None and operation.last_seq == len(events)
    assert operation.result == 2 and operation.status is OperationStatus.COMPLETED
    assert [(r.step, r.outcome) for r in await storage.step_records(op_id)] == [
        (0, "completed"),
        (1, "completed"),
        (2, "completed"),
    ]


async def test_list_pages_newest_first_and_filters(storage: Storage) -> None:
    ids = [(await storage.create("echo", {"i": i}, None)).operation.id for i in range(7)]
    await storage.claim_and_start(ids[0], "r", 10)
    seen: list[str] = []
    page, cursor = await storage.list_page(None, 3, None)
    seen += [o.id for o in page]
    while cursor is not None:
        page, cursor = await storage.list_page(None, 3, cursor)
        seen += [o.id for o in page]
    assert seen == list(reversed(ids))
    running_page, _ = await storage.list_page("RUNNING", 10, None)
    assert [o.id for o in running_page] == [ids[0]]
    await storage.record_stop(ids[0], "a", "")
    assert (await storage.list_page("RUNNING", 10, None))[0] == []
    assert [o.id for o in (await storage.list_page("STOPPING", 10, None))[0]] == [ids[0]]


def test_sqlite_records_a_running_operations_stop_without_rewriting_an_index(
    tmp_path: Path,
) -> None:
    """The stop a client waits on most (on a RUNNING operation) is one UPDATE that names no
    indexed column: SQLite rewrites the entries of every index on a column the SET names,
    changed or not, and each rewritten index adds pages to the stop's commit. EXPLAIN lists an
    IdxDelete for each index the statement maintains."""
    path = tmp_path / "explain.db"
    upgrade_to_head(create_engine(f"sqlite:///{path}"))
    params = {"id": "x", "now": "t", "by": "b", "reason": "r", "cause": "c", "owner": ""}
    with closing(sqlite3.connect(path)) as db:

        def index_writes(sql: str) -> int:
            program = db.execute(f"EXPLAIN {sql}", params).fetchall()
            return sum(1 for op in program if op[1] == "IdxDelete")

        assert index_writes(RECORD_STOP_RUNNING.text) == 0
        # The other statement changes the status, so it must keep the indexes on it current.
        assert index_writes(RECORD_STOP_IDLE.text) >= 2
