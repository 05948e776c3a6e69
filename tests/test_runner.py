"""The step loop driven directly (no gRPC), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime_service.agents.registry import AgentRegistry
from runtime_service.app import RuntimeApp
from runtime_service.domain import Event, EventKind, OperationStatus
from tests.agents import CarefulAgent, GatedAgent, registry
from tests.conftest import eventually, opened_storage, runtime_config

TICKER_30S = {"steps": 3, "step_seconds": 30, "chunk_interval_seconds": 1}


async def collect(
    app: RuntimeApp, op_id: str, after_seq: int = 0, timeout: float = 20
) -> list[Event]:
    async def run() -> list[Event]:
        return [e async for e in app.operations.watch(op_id, after_seq)]

    return await asyncio.wait_for(run(), timeout)


async def first_event(app: RuntimeApp, op_id: str, kind: EventKind) -> Event:
    async for event in app.operations.watch(op_id, 0):
        if event.kind is kind:
            return event
    raise AssertionError(f"operation ended without a {kind} event")


async def test_long_step_is_cancelled_mid_step(app: RuntimeApp) -> None:
    op = (await app.operations.start("ticker", TICKER_30S, "")).operation
    await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
    began = time.monotonic()
    result = await app.operations.interrupt(op.id, "test", "too slow")
    assert result.outcome.value == "ACCEPTED"
    assert result.operation.is_stopping or result.operation.status is OperationStatus.INTERRUPTED
    events = await collect(app, op.id)
    halted_after = time.monotonic() - began
    final = events[-1]
    assert final.kind is EventKind.INTERRUPTED
    assert final.data["mid_step"] is True and final.data["step"] == 0
    assert halted_after < 10, "the stop waited for the 30-second step"
    assert 0 <= final.data["halt_ms"] < 10_000
    kinds = [e.kind for e in events]
    assert EventKind.OUTPUT_CHUNK in kinds  # output emitted before the stop is kept
    assert kinds.index(EventKind.STOP_REQUESTED) < kinds.index(EventKind.INTERRUPTED)
    assert EventKind.STEP_COMPLETED not in kinds
    stored = await app.operations.get(op.id)
    assert stored.status is OperationStatus.INTERRUPTED and stored.steps_completed == 0
    records = await app.storage.step_records(op.id)
    assert [(r.step, r.outcome) for r in records] == [(0, "interrupted")]


async def test_cancelled_step_gets_to_clean_up(app: RuntimeApp, gated: GatedAgent) -> None:
    op = (await app.operations.start("gated", {}, "")).operation
    await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
    await app.operations.interrupt(op.id, "test", "")
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED
    assert (op.id, 0) in gated.cleaned_up


async def test_a_stop_cancels_the_step_in_flight_before_the_stop_call_returns(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    """The stop's own call cancels the step (runs.stop), so the step unwinds at the loop's very
    next turn instead of after the step loop has woken and cancelled it two turns later: the
    halt's write begins sooner."""
    op = (await app.operations.start("gated", {}, "")).operation
    await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
    await app.operations.interrupt(op.id, "test", "")
    assert (op.id, 0) not in gated.cleaned_up  # cancelled, not yet unwound
    await asyncio.sleep(0)  # one turn of the loop
    assert (op.id, 0) in gated.cleaned_up
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED and events[-1].data["mid_step"] is True


async def test_an_agent_cleaning_up_after_a_stop_sees_one_cancellation(db_url: str) -> None:
    """The stop cancels the step and the step loop does not cancel it again: an agent's own
    clean-up (an await after its CancelledError) runs to its end."""
    careful = CarefulAgent()
    app = await RuntimeApp.open(runtime_config(db_url), AgentRegistry({"careful": careful}))
    try:
        op = (await app.operations.start("careful", {}, "")).operation
        await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
        await app.operations.interrupt(op.id, "test", "")
        events = await collect(app, op.id)
        assert events[-1].kind is EventKind.INTERRUPTED
        assert careful.cancellations == {op.id: 1}
        assert careful.cleaned_up == {op.id}
    finally:
        await app.close()


async def test_stop_while_pending_means_no_step_ever_starts(db_url: str, gated: GatedAgent) -> None:
    app = await RuntimeApp.open(runtime_config(db_url, max_running=1), registry(gated))
    try:
        busy = (await app.operations.start("gated", {}, "")).operation
        await asyncio.wait_for(first_event(app, busy.id, EventKind.STEP_STARTED), 10)
        waiting = (await app.operations.start("gated", {}, "")).operation
        assert (await app.operations.get(waiting.id)).status is OperationStatus.PENDING

        result = await app.operations.interrupt(waiting.id, "test", "early")
        assert result.outcome.value == "ACCEPTED"
        assert result.operation.status is OperationStatus.INTERRUPTED

        gated.open(busy.id)  # free the only slot
        busy_events = await collect(app, busy.id)
        assert busy_events[-1].kind is EventKind.COMPLETED
        await app.runner.wait_finished(waiting.id)

        events = await collect(app, waiting.id)
        assert [e.kind for e in events] == [
            EventKind.CREATED,
            EventKind.STOP_REQUESTED,
            EventKind.INTERRUPTED,
        ]
        assert events[-1].data["mid_step"] is False
        assert await app.storage.step_records(waiting.id) == []
        assert all(op_id != waiting.id for op_id, _ in gated.steps_started)
    finally:
        await app.close()


async def test_agent_ignoring_cancellation_is_bounded_by_the_grace(app: RuntimeApp) -> None:
    op = (await app.operations.start("stubborn", {}, "")).operation
    await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
    await app.operations.interrupt(op.id, "test", "")
    events = await collect(app, op.id)
    final = events[-1]
    assert final.kind is EventKind.INTERRUPTED and final.data["mid_step"] is True
    # The runtime waited for the agent's grace (0.5 s in tests), then halted regardless.
    assert final.data["halt_ms"] >= 400


async def test_agent_error_fails_the_operation_after_checkpointed_steps(app: RuntimeApp) -> None:
    op = (
        await app.operations.start("ticker", {"steps": 3, "step_seconds": 0, "fail_at_step": 1}, "")
    ).operation
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.FAILED
    assert "fail at step 1" in events[-1].data["error"]
    stored = await app.operations.get(op.id)
    assert stored.status is OperationStatus.FAILED and stored.steps_completed == 1


async def test_unserialisable_state_fails_cleanly(app: RuntimeApp) -> None:
    op = (await app.operations.start("unserialisable", {}, "")).operation
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.FAILED
    assert "not JSON-serialisable" in events[-1].data["error"]


async def test_state_that_utf8_cannot_store_fails_cleanly(app: RuntimeApp) -> None:
    # Before, the write itself failed in the driver: the run crashed and the operation stayed
    # RUNNING, to crash again on every resume.
    op = (await app.operations.start("unserialisable", {"surrogate": True}, "")).operation
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.FAILED
    error = events[-1].data["error"]
    assert "not JSON-serialisable" in error and "lone surrogate (U+D83D" in error


async def test_an_error_holding_a_lone_surrogate_is_stored_escaped(app: RuntimeApp) -> None:
    op = (await app.operations.start("unserialisable", {"raise_surrogate": True}, "")).operation
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.FAILED
    assert events[-1].data["error"] == "RuntimeError: the model said \\ud83d"


async def test_completed_operation_keeps_result_and_gap_free_events(app: RuntimeApp) -> None:
    op = (await app.operations.start("ticker", {"steps": 3, "step_seconds": 0.01}, "")).operation
    events = await collect(app, op.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind is EventKind.COMPLETED
    stored = await app.operations.get(op.id)
    assert stored.status is OperationStatus.COMPLETED and stored.steps_completed == 3
    assert stored.result == events[-1].data["result"]
    # Interrupting now changes nothing and says so.
    result = await app.operations.interrupt(op.id, "late", "")
    assert result.outcome.value == "ALREADY_FINISHED"
    assert await app.operations.get(op.id) == stored


async def test_restart_resumes_from_last_completed_step(db_url: str, gated: GatedAgent) -> None:
    first = await RuntimeApp.open(runtime_config(db_url), registry(gated))
    op = (await first.operations.start("gated", {"steps": 3}, "")).operation
    gated.release(op.id)  # step 0 completes; step 1 starts and blocks
    await eventually(lambda: _in_step(gated, op.id))
    await first.close()  # like a process exit: nothing terminal is written

    reader = await opened_storage(db_url)
    try:
        left = await reader.get(op.id)
    finally:
        await reader.close()
    assert left is not None and left.status is OperationStatus.RUNNING
    checkpoint = left.steps_completed
    assert checkpoint == 1

    second = await RuntimeApp.open(runtime_config(db_url), registry(gated))
    try:
        gated.open(op.id)
        events = await collect(second, op.id, after_seq=left.last_seq)
        started = events[0]
        assert started.kind is EventKind.STARTED
        assert started.data == {"from_step": checkpoint, "resumed": True}
        assert events[-1].kind is EventKind.COMPLETED
        assert [e.seq for e in events] == list(range(left.last_seq + 1, events[-1].seq + 1))
        records = await second.storage.step_records(op.id)
        assert [(r.step, r.attempt, r.outcome) for r in records] == [
            (0, 1, "completed"),
            (1, 1, "abandoned"),  # in flight when the first process went away
            (1, 2, "completed"),  # re-run by the second; step 0 was not
            (2, 1, "completed"),
        ]
        # Settled by the takeover, before the new attempt began.
        assert records[1].finished_at is not None
        assert records[1].finished_at <= records[2].started_at
    finally:
        await second.close()


async def _in_step(gated: GatedAgent, op_id: str) -> bool:
    return sum(1 for o, _ in gated.steps_started if o == op_id) >= 2


async def test_held_operation_runs_no_step_until_released(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    held = (await app.operations.start("gated", {}, "", hold_seconds=30)).operation
    stopped = (await app.operations.start("gated", {}, "", hold_seconds=30)).operation
    assert (await app.operations.get(held.id)).status is OperationStatus.PENDING
    # A stop while held ends it without any step: the reason a gateway holds its starts.
    result = await app.operations.interrupt(stopped.id, "gateway", "client left during start")
    assert result.operation.status is OperationStatus.INTERRUPTED
    assert not any(op_id == stopped.id for op_id, _ in gated.steps_started)
    assert await app.storage.step_records(stopped.id) == []
    await app.operations.release(stopped.id)  # releasing a stopped operation changes nothing
    await app.operations.release(held.id)
    await asyncio.wait_for(first_event(app, held.id, EventKind.STEP_STARTED), 10)
    gated.open(held.id)
    assert (await collect(app, held.id))[-1].kind is EventKind.COMPLETED
    assert (await app.operations.get(stopped.id)).status is OperationStatus.INTERRUPTED


async def test_hold_expires_on_its_own(app: RuntimeApp) -> None:
    op = (await app.operations.start("echo", {}, "", hold_seconds=0.05)).operation
    assert (await collect(app, op.id))[-1].kind is EventKind.COMPLETED


async def test_only_if_unwatched_spares_a_watched_operation(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    op = (await app.operations.start("gated", {}, "")).operation
    watching = asyncio.create_task(collect(app, op.id))
    await eventually(lambda: _watched(app, op.id))
    skipped = await app.operations.interrupt(op.id, "grace", "", only_if_unwatched=True)
    assert skipped.outcome.value == "SKIPPED_WATCHED"
    assert skipped.operation.stop is None
    watching.cancel()
    await eventually(lambda: _watched(app, op.id, count=0))
    applied = await app.operations.interrupt(op.id, "grace", "", only_if_unwatched=True)
    assert applied.outcome.value == "ACCEPTED"
    assert (await collect(app, op.id))[-1].kind is EventKind.INTERRUPTED


async def test_labels_are_stored_and_part_of_idempotency(app: RuntimeApp) -> None:
    from stopline.errors import AlreadyExists, InvalidArgument

    first = await app.operations.start("echo", {}, "k", labels={"policy": "stop"})
    assert first.operation.labels == {"policy": "stop"}
    again = await app.operations.start("echo", {}, "k", labels={"policy": "stop"})
    assert not again.created and again.operation.id == first.operation.id
    with pytest.raises(AlreadyExists):
        await app.operations.start("echo", {}, "k", labels={"policy": "keep"})
    for bad in ({"": "x"}, {"k" * 64: "x"}, {"k": "v" * 257}, {str(i): "" for i in range(33)}):
        with pytest.raises(InvalidArgument, match="labels"):
            await app.operations.start("echo", {}, "", labels=bad)


async def _watched(app: RuntimeApp, op_id: str, count: int = 1) -> bool:
    return app.hub.watcher_count(op_id) == count


async def test_stop_at_boundary_mode_lets_the_step_finish(db_url: str, gated: GatedAgent) -> None:
    """The benchmarks' baseline: with mid-step abort off, a stop waits for the step."""
    app = await RuntimeApp.open(runtime_config(db_url, abort_mid_step=False), registry(gated))
    try:
        op = (await app.operations.start("gated", {"steps": 3}, "")).operation
        await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
        await app.operations.interrupt(op.id, "test", "")
        gated.release(op.id)  # the step ends on its own
        events = await collect(app, op.id)
        kinds = [e.kind for e in events]
        assert EventKind.STEP_COMPLETED in kinds
        assert events[-1].kind is EventKind.INTERRUPTED
        assert events[-1].data == {**events[-1].data, "mid_step": False, "step": 1}
    finally:
        await app.close()


async def test_the_step_loops_wait_leaves_both_futures_alone_when_it_is_cancelled() -> None:
    """The step loop waits for its step or its stop with steps._first_done (asyncio.wait, for
    less): it returns on either, and a runner cancelled while waiting (shutdown) cancels neither
    the step nor the stop."""
    from runtime_service.runner.steps import _first_done

    loop = asyncio.get_running_loop()
    step: asyncio.Future[None] = loop.create_future()
    stop: asyncio.Future[None] = loop.create_future()
    waiting = asyncio.create_task(_first_done(step, stop))
    await asyncio.sleep(0)
    stop.set_result(None)
    await asyncio.wait_for(waiting, 5)
    assert not step.done()

    stop = loop.create_future()
    waiting = asyncio.create_task(_first_done(step, None))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not step.cancelled() and not step.done()
    step.set_result(None)
    await asyncio.wait_for(_first_done(step, stop), 5)  # done already: returns at once
