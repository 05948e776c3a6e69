"""What the `interrupted` event and the attempt rows say about a halt, on both backends: a step
cut by a crash, halt_ms measured from the committed stop, and no output after a stop.
(Issue 11, defects 6 and 8.)"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from runtime_service.agents.base import StepContext, StepResult
from runtime_service.agents.registry import AgentRegistry
from runtime_service.app import RuntimeApp
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.runner import OperationHalted
from runtime_service.storage import PostgresStorage, SqliteStorage
from runtime_service.storage import postgres as pg_storage
from runtime_service.storage.pg_batch import Statement
from tests.agents import GatedAgent
from tests.conftest import eventually, opened_storage, runtime_config


class ChattyAgent:
    """Emits output continuously; when cancelled, tries to emit once more while cleaning up."""

    def __init__(self) -> None:
        self.emitted = 0
        self.halted: BaseException | None = None  # what an emit refused after the stop raised
        self.ended = asyncio.Event()

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        try:
            while True:
                await ctx.emit(f"chunk {self.emitted}")
                self.emitted += 1
                await asyncio.sleep(0.005)
        except OperationHalted as exc:  # refused: the stop committed before it reached us
            self.halted = exc
            raise
        except asyncio.CancelledError:  # the stop reached us first
            try:
                await ctx.emit("cleaning up")
            except OperationHalted as exc:
                self.halted = exc
            raise
        finally:
            self.ended.set()


class CuedAgent:
    """Emits one chunk, then a second one when the test says so."""

    def __init__(self) -> None:
        self.cue = asyncio.Event()
        self.second: BaseException | None = None

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        await ctx.emit("first")
        await self.cue.wait()
        try:
            await ctx.emit("second")
        except OperationHalted as exc:
            self.second = exc
            raise
        return StepResult(output="done", done=True)


def agents(gated: GatedAgent, **more: Any) -> AgentRegistry:
    return AgentRegistry({"gated": gated, **more})


async def collect(app: RuntimeApp, op_id: str, timeout: float = 20) -> list[Event]:
    async def run() -> list[Event]:
        return [e async for e in app.operations.watch(op_id, 0)]

    return await asyncio.wait_for(run(), timeout)


async def stored_kinds(app: RuntimeApp, op_id: str) -> list[EventKind]:
    return [e.kind for e in await app.storage.events_after(op_id, 0)]


async def crash(app: RuntimeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies: its runs end without anything written, and its leases are not handed
    back (they lapse on their own)."""

    async def hand_back_nothing(runner_id: str) -> int:
        return 0

    monkeypatch.setattr(app.storage, "drop_leases", hand_back_nothing)
    await app.close()


# --------------------------------------------------------------- defect 6: a step cut by a crash


async def test_stop_while_the_runtime_is_dead_mid_step_says_the_step_was_cut(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated = GatedAgent()
    first = await RuntimeApp.open(
        runtime_config(db_url, runner_id="A", lease_seconds=1.0), agents(gated)
    )
    op = (await first.operations.start("gated", {"steps": 3}, "")).operation
    gated.release(op.id)  # step 0 completes; step 1 begins and blocks
    await eventually(lambda: _steps_begun(gated, op.id, 2))
    await crash(first, monkeypatch)  # step 1 in flight

    # Another runtime records the stop while nobody runs the operation.
    other = await opened_storage(db_url)
    try:
        stopped = await other.record_stop(op.id, "user", "while its runtime was dead")
    finally:
        await other.close()
    assert stopped is not None and stopped.outcome.value == "ACCEPTED"
    assert stopped.operation.is_stopping

    second = await RuntimeApp.open(runtime_config(db_url, runner_id="B"), agents(gated))
    try:
        events = await collect(second, op.id)  # ends once B halts the orphan
        final = events[-1]
        assert final.kind is EventKind.INTERRUPTED
        assert final.data["mid_step"] is True and final.data["step"] == 1
        began = [e.data["step"] for e in events if e.kind is EventKind.STEP_STARTED]
        assert began == [0, 1]  # not resumed: the stop won over the takeover
        records = await second.storage.step_records(op.id)
        assert [(r.step, r.attempt, r.outcome) for r in records] == [
            (0, 1, "completed"),
            (1, 1, "abandoned"),
        ]
        assert records[1].finished_at == final.created_at
    finally:
        await second.close()


async def _steps_begun(gated: GatedAgent, op_id: str, count: int) -> bool:
    return sum(1 for o, _ in gated.steps_started if o == op_id) >= count


# ------------------------------------------------------------ defect 8: halt_ms and late output


async def test_halt_ms_excludes_the_time_the_stop_took_to_commit(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop's write is held for a second before it commits (queued behind a slow batch, a
    slow disk): halt_ms must not count that second, only what came after the commit."""
    hold = 1.0
    gated = GatedAgent()
    app = await RuntimeApp.open(runtime_config(db_url), agents(gated))
    try:
        storage = app.storage
        if isinstance(storage, PostgresStorage):  # the stop is one batched statement
            for batcher in storage.batchers:

                def slowed(submit: Any) -> Any:
                    async def later(statement: Statement[Any]) -> Any:
                        await asyncio.sleep(hold)  # injected delay: the write waits to commit
                        return await submit(statement)

                    def slow(statement: Statement[Any]) -> Any:
                        if statement.sql is pg_storage._RECORD_STOP:
                            return asyncio.ensure_future(later(statement))
                        return submit(statement)

                    return slow

                monkeypatch.setattr(batcher, "submit", slowed(batcher.submit))
        else:  # SQLite: the stop's transaction is held open, after its UPDATE, before commit
            assert isinstance(storage, SqliteStorage)
            record, row = storage._record_stop, storage.cursors.row
            stopping = threading.local()

            def flagged(*args: Any) -> Any:
                stopping.on = True
                try:
                    return record(*args)
                finally:
                    stopping.on = False

            def slow_row(cursor: Any) -> Any:
                read = row(cursor)
                if getattr(stopping, "on", False):
                    time.sleep(hold)  # wherever the write runs (inline or queued); injected delay
                return read

            monkeypatch.setattr(storage, "_record_stop", flagged)
            monkeypatch.setattr(storage.cursors, "row", slow_row)

        op = (await app.operations.start("gated", {}, "")).operation
        await eventually(lambda: _steps_begun(gated, op.id, 1))
        began = time.monotonic()
        await app.operations.interrupt(op.id, "test", "")
        assert time.monotonic() - began >= hold  # the delay really held the stop back
        final = (await collect(app, op.id))[-1]
        assert final.kind is EventKind.INTERRUPTED and final.data["mid_step"] is True
        assert 0 <= final.data["halt_ms"] < hold * 1000
    finally:
        await app.close()


async def test_no_output_is_stored_after_the_stop_event(db_url: str) -> None:
    """An agent emitting continuously, and once more while it is cancelled: what it emitted
    before the stop is kept, nothing after the stop_requested event is stored."""
    chatty = ChattyAgent()
    app = await RuntimeApp.open(runtime_config(db_url), agents(GatedAgent(), chatty=chatty))
    try:
        op = (await app.operations.start("chatty", {}, "")).operation
        await eventually(lambda: _emitted(chatty, 3))
        await app.operations.interrupt(op.id, "test", "")
        events = await collect(app, op.id)
        kinds = [e.kind for e in events]
        stop = kinds.index(EventKind.STOP_REQUESTED)
        assert kinds[stop + 1 :] == [EventKind.INTERRUPTED]
        assert kinds[:stop].count(EventKind.OUTPUT_CHUNK) >= 3  # emitted before: kept
        assert events[-1].data["mid_step"] is True
        await asyncio.wait_for(chatty.ended.wait(), 10)
        assert isinstance(chatty.halted, OperationHalted)  # told, not silently dropped
        assert await stored_kinds(app, op.id) == kinds
    finally:
        await app.close()


async def _emitted(agent: ChattyAgent, count: int) -> bool:
    return agent.emitted >= count


async def test_output_refused_by_a_stop_not_yet_delivered_halts_the_step(db_url: str) -> None:
    """The stop is recorded where this runner does not hear of it (no call through this
    runtime; the periodic re-read is far off): the step's next output is refused, and that
    alone halts the operation mid-step, INTERRUPTED rather than FAILED."""
    cued = CuedAgent()
    config = runtime_config(db_url, lease_seconds=60.0, poll_seconds=30.0)
    app = await RuntimeApp.open(config, agents(GatedAgent(), cued=cued))
    try:
        op = (await app.operations.start("cued", {}, "")).operation
        await eventually(lambda: _has_output(app, op.id))
        other = await opened_storage(db_url)  # another replica's write
        try:
            assert await other.record_stop(op.id, "user", "elsewhere") is not None
        finally:
            await other.close()
        cued.cue.set()
        events = await collect(app, op.id)
        kinds = [e.kind for e in events]
        assert kinds[kinds.index(EventKind.STOP_REQUESTED) + 1 :] == [EventKind.INTERRUPTED]
        assert events[-1].data["mid_step"] is True and events[-1].data["step"] == 0
        texts = [e.data["text"] for e in events if e.kind is EventKind.OUTPUT_CHUNK]
        assert texts == ["first"]
        operation = await app.operations.get(op.id)
        assert operation.status is OperationStatus.INTERRUPTED
        records = await app.storage.step_records(op.id)
        assert [(r.step, r.outcome) for r in records] == [(0, "interrupted")]
    finally:
        await app.close()


async def _has_output(app: RuntimeApp, op_id: str) -> bool:
    return EventKind.OUTPUT_CHUNK in await stored_kinds(app, op_id)


async def test_a_stop_recorded_by_another_replica_reaches_watchers_with_no_read(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a stop recorded by another replica (another storage's write) reaches this
    replica's watchers of the operation in its notification, stop_requested then the
    interrupted event this replica's runner writes, in order and without one read of the
    operation's events from storage between the stop and the terminal event (before, the
    notification only sent the watchers back to storage, a round trip on the stop's path)."""
    gated = GatedAgent()
    # Only the notification brings the stop: the watch's quiet spells and the runner's periodic
    # look at stored stops (a fallback, whose win would cost the read) are far off.
    config = runtime_config(
        postgres_url, watch_poll_seconds=60.0, poll_seconds=60.0, lease_seconds=120.0
    )
    app = await RuntimeApp.open(config, agents(gated))
    other = await opened_storage(postgres_url)  # another replica's write
    try:
        # Listening before the watch: connecting pokes every watcher back to storage.
        assert app.listener is not None
        await asyncio.wait_for(app.listener.connected.wait(), 10)
        op = (await app.operations.start("gated", {}, "")).operation
        watch = app.operations.watch(op.id, 0)
        async for event in watch:
            if event.kind is EventKind.OUTPUT_CHUNK:
                break  # the step emitted its chunk and now waits at its gate
        reads: list[int] = []
        events_after = app.storage.events_after

        async def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(1)
            return await events_after(*args, **kwargs)

        monkeypatch.setattr(app.storage, "events_after", counted)
        assert await other.record_stop(op.id, "user", "elsewhere") is not None
        rest = [event async for event in watch]
        assert [e.kind for e in rest] == [EventKind.STOP_REQUESTED, EventKind.INTERRUPTED]
        assert rest[0].data["requested_by"] == "user" and rest[0].data["reason"] == "elsewhere"
        assert reads == []
        # What the watchers got from the notification is what storage holds.
        stored = await events_after(op.id, rest[0].seq - 1, 1)
        assert stored[0].data == rest[0].data and stored[0].seq == rest[0].seq
    finally:
        await other.close()
        await app.close()
