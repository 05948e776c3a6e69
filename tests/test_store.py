"""The store on its own: compare-and-set transitions, stop intent, gap-free events."""

from __future__ import annotations

import pytest

from runtime_service.domain import EventKind, InterruptOutcome, OperationStatus
from runtime_service.store import OperationStore
from stopline.errors import AlreadyExists


def seqs(store: OperationStore, op_id: str) -> list[int]:
    return [e.seq for e in store.events_after(op_id, 0)]


def test_create_writes_pending_operation_and_first_event(store: OperationStore) -> None:
    created = store.create("echo", {"a": 1}, None)
    assert created.created
    assert created.operation.status is OperationStatus.PENDING
    assert [e.kind for e in created.events] == [EventKind.CREATED]
    assert created.operation.last_seq == 1 and seqs(store, created.operation.id) == [1]


def test_idempotency_key_returns_same_operation_or_conflicts(store: OperationStore) -> None:
    first = store.create("echo", {"a": 1}, "key-1")
    again = store.create("echo", {"a": 1}, "key-1")
    assert not again.created and again.operation.id == first.operation.id
    with pytest.raises(AlreadyExists, match="key-1"):
        store.create("echo", {"a": 2}, "key-1")
    with pytest.raises(AlreadyExists):
        store.create("ticker", {"a": 1}, "key-1")
    assert seqs(store, first.operation.id) == [1]


def test_stop_of_pending_operation_interrupts_it_and_blocks_claim(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    result = store.record_stop(op.id, "alice", "changed my mind")
    assert result is not None and result.outcome is InterruptOutcome.ACCEPTED
    assert result.operation.status is OperationStatus.INTERRUPTED
    assert [e.kind for e in result.events] == [EventKind.STOP_REQUESTED, EventKind.INTERRUPTED]
    assert result.events[1].data["mid_step"] is False
    assert store.claim(op.id, "runner", 10) is None
    assert store.start_step(op.id, 0, "runner") is None
    assert store.step_records(op.id) == []


def test_stop_is_idempotent_and_never_changes_a_finished_operation(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    assert store.claim(op.id, "r", 10) is not None
    assert store.start_step(op.id, 0, "r") is not None
    store.complete_step(op.id, 0, "out", None, True, "r")
    before = store.get(op.id)
    assert before is not None and before.status is OperationStatus.COMPLETED
    for _ in range(2):
        result = store.record_stop(op.id, "bob", "late")
        assert result is not None and result.outcome is InterruptOutcome.ALREADY_FINISHED
        assert result.events == ()
    assert store.get(op.id) == before

    running = store.create("echo", {}, None).operation
    assert store.claim(running.id, "r", 10) is not None
    first = store.record_stop(running.id, "bob", "one")
    second = store.record_stop(running.id, "carol", "two")
    assert first is not None and first.outcome is InterruptOutcome.ACCEPTED
    assert second is not None and second.outcome is InterruptOutcome.ALREADY_REQUESTED
    stopped = store.get(running.id)
    assert stopped is not None and stopped.stop is not None
    assert stopped.stop.requested_by == "bob"  # the first stop is the one recorded
    assert store.record_stop("00000000-0000-0000-0000-000000000000", "x", "") is None


def test_step_checkpoint_never_overwrites_stop_intent(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    store.claim(op.id, "r", 10)
    store.start_step(op.id, 0, "r")
    store.record_stop(op.id, "alice", "stop")
    written = store.complete_step(op.id, 0, "out", {"s": 1}, True, "r")
    # The step's checkpoint is kept, but completion is refused: the stop came first.
    assert [e.kind for e in written] == [EventKind.STEP_COMPLETED]
    after = store.get(op.id)
    assert after is not None
    assert after.status is OperationStatus.RUNNING and after.is_stopping
    assert after.stop is not None and after.stop.requested_by == "alice"
    assert after.steps_completed == 1 and after.agent_state == {"s": 1}
    # No further step may begin once a stop is recorded.
    assert store.start_step(op.id, 1, "r") is None
    final = store.finish_interrupted(op.id, 1, False, "r")
    assert final is not None and final.kind is EventKind.INTERRUPTED
    assert final.data["halt_ms"] >= 0


def test_no_output_is_stored_once_a_stop_is_recorded(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    store.claim(op.id, "r", 10)
    store.start_step(op.id, 0, "r")
    assert store.append_chunk(op.id, 0, "before", "r") is not None
    store.record_stop(op.id, "alice", "stop")
    assert store.append_chunk(op.id, 0, "after", "r") is None
    # The stop-at-boundary mode lets the step in flight finish, and keeps its output.
    kept = store.append_chunk(op.id, 0, "at-boundary mode", "r", outlives_stop=True)
    assert kept is not None
    texts = [e.data["text"] for e in store.events_after(op.id, 0) if e.kind.value == "output_chunk"]
    assert texts == ["before", "at-boundary mode"]


def test_terminal_states_never_change(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    store.claim(op.id, "r", 10)
    store.start_step(op.id, 0, "r")
    assert store.finish_failed(op.id, 0, "boom", "r") is not None
    snapshot = store.get(op.id)
    assert store.finish_interrupted(op.id, 0, True, "r") is None
    assert store.complete_step(op.id, 0, "x", None, True, "r") == []
    assert store.append_chunk(op.id, 0, "late output", "r") is None
    assert store.claim(op.id, "other", 10) is None
    assert store.get(op.id) == snapshot


def test_event_sequence_is_gap_free(store: OperationStore) -> None:
    op = store.create("echo", {}, None).operation
    store.claim(op.id, "r", 10)
    for step in range(3):
        store.start_step(op.id, step, "r")
        for i in range(4):
            store.append_chunk(op.id, step, f"{step}.{i}", "r")
        store.complete_step(op.id, step, step, {"n": step}, step == 2, "r")
    events = store.events_after(op.id, 0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind is EventKind.COMPLETED
    assert [e.seq for e in store.events_after(op.id, 5)] == list(range(6, len(events) + 1))
    operation = store.get(op.id)
    assert operation is not None and operation.last_seq == len(events)


def test_list_pages_newest_first_and_filters(store: OperationStore) -> None:
    ids = [store.create("echo", {"i": i}, None).operation.id for i in range(7)]
    store.claim(ids[0], "r", 10)
    seen: list[str] = []
    page, cursor = store.list_page(None, 3, None)
    seen += [o.id for o in page]
    while cursor is not None:
        page, cursor = store.list_page(None, 3, cursor)
        seen += [o.id for o in page]
    assert seen == list(reversed(ids))
    running, _ = store.list_page("RUNNING", 10, None)
    assert [o.id for o in running] == [ids[0]]
    store.record_stop(ids[0], "a", "")
    assert store.list_page("RUNNING", 10, None)[0] == []
    assert [o.id for o in store.list_page("STOPPING", 10, None)[0]] == [ids[0]]
