"""Waiting for a person, in-process on SQLite and PostgreSQL: the `llm` agent asks before a tool
that needs approval and the operation waits holding no slot; approved, rejected and edited
answers; the first of racing answers wins and the tool runs at most once; repeats, foreign
principals, schema mismatches and expiry; a stop while waiting; pause and resume."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fake_llm import FakeLLM
from fake_llm.script import TextTurn, ToolCall, ToolCallsTurn
from fake_llm.server import ServerConfig
from runtime_service.agents.base import InputRequest, StepContext, StepResult
from runtime_service.agents.llm import LLMAgent
from runtime_service.agents.registry import AgentRegistry
from runtime_service.app import RuntimeApp
from runtime_service.domain import (
    AnswerOutcome,
    Event,
    EventKind,
    OperationStatus,
    PauseOutcome,
    ResumeOutcome,
)
from runtime_service.tools import ToolRegistry
from stopline.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.conftest import eventually, runtime_config
from tests.test_llm_e2e import API_KEY, USER, llm_settings
from tests.test_runner import collect
from tests.waiting_tools import SendTool

SEND = '{"to": "bob", "amount": 5}'
APPROVE: dict[str, Any] = {"approved": True, "reason": ""}


class AskerAgent:
    """Step 0 asks a question (input: expires_in, default); step 1 ends with what it got."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        if ctx.step == 0:
            return StepResult(
                state={"asked": True},
                output="asked",
                ask=InputRequest.question(
                    "Which colour?",
                    schema={
                        "type": "object",
                        "properties": {"colour": {"type": "string"}},
                        "required": ["colour"],
                    },
                    expires_in=ctx.input.get("expires_in"),
                    default=ctx.input.get("default"),
                ),
            )
        assert ctx.answer is not None
        return StepResult(
            output={"value": ctx.answer.value, "expired": ctx.answer.expired}, done=True
        )


class CutOnceAgent:
    """Two steps; the first attempt at step 0 hangs (until a stop or pause cuts it), every later
    attempt returns at once. Counts attempts per operation (in this process)."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = defaultdict(int)
        self.hanging: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        if ctx.step == 0:
            self.attempts[ctx.operation_id] += 1
            # Across processes (input "marker": a file path), the first attempt is the one that
            # finds no marker file.
            marker = ctx.input.get("marker")
            first = self.attempts[ctx.operation_id] == 1
            if marker is not None:
                first = not await asyncio.to_thread(Path(marker).exists)
                await asyncio.to_thread(Path(marker).touch)
            if first:
                await ctx.emit("working")
                self.hanging[ctx.operation_id].set()
                await asyncio.Event().wait()
        return StepResult(state={"step": ctx.step}, output=ctx.step, done=ctx.step == 1)


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM(ServerConfig(tokens_per_second=0, api_key=API_KEY))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def cut_once() -> CutOnceAgent:
    return CutOnceAgent()


@pytest.fixture
async def app(db_url: str, fake: FakeLLM, cut_once: CutOnceAgent) -> AsyncIterator[RuntimeApp]:
    SendTool.runs.clear()
    base = ToolRegistry.load(use_entry_points=False)
    tools = ToolRegistry({"send": SendTool(), "sleep": base.get("sleep")})  # type: ignore[dict-item]
    settings = llm_settings(fake)
    agents = AgentRegistry(
        {
            "llm": LLMAgent(settings, tool_names=lambda: tools.names),
            "asker": AskerAgent(),
            "cut_once": cut_once,
        }
    )
    opened = await RuntimeApp.open(runtime_config(db_url, llm=settings), agents, tools)
    try:
        yield opened
    finally:
        await opened.close()


async def waiting_request(app: RuntimeApp, op_id: str) -> Event:
    """Once the operation is WAITING: its input_requested event."""

    async def waiting() -> Event | None:
        operation = await app.operations.get(op_id)
        if operation.status is not OperationStatus.WAITING:
            return None
        events = await app.storage.events_after(op_id, 0)
        return next(e for e in reversed(events) if e.kind is EventKind.INPUT_REQUESTED)

    return await eventually(waiting, timeout=20)


async def start_send(app: RuntimeApp, fake: FakeLLM, owner: str = "") -> tuple[str, Event]:
    fake.set_script(
        [
            ToolCallsTurn(calls=(ToolCall("send", SEND, id="call_send"),)),
            TextTurn(text="Done."),
        ]
    )
    input = {"messages": [USER], "tools": ["send"]}
    op = (await app.operations.start("llm", input, "", owner=owner)).operation
    return op.id, await waiting_request(app, op.id)


def tool_answer(fake: FakeLLM) -> str:
    """What the model was told of the call, in its second request."""
    second = fake.requests[-1].messages
    [told] = [m for m in second if m.get("role") == "tool"]
    return str(told["content"])


async def test_approval_waits_holding_no_slot_then_runs_once(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    op_id, asked = await start_send(app, fake)
    data = asked.data
    assert data["kind"] == "approval" and data["tool_name"] == "send"
    assert data["call_id"] == "call_send" and data["arguments"] == {"to": "bob", "amount": 5}
    assert data["default_answer"]["approved"] is False  # deny unless the agent says otherwise
    # Waiting holds nothing: no run (slot, coroutine) for it on the runner.
    assert op_id not in app.runner._runs
    assert app.runner.has_room
    assert SendTool.runs == []

    outcome, result = await app.operations.answer(
        op_id, data["request_id"], "a-1", APPROVE, "alice"
    )
    assert outcome is AnswerOutcome.ACCEPTED
    assert result.request.answer_id == "a-1"
    events = await collect(app, op_id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert SendTool.runs == [{"to": "bob", "amount": 5}]
    kinds = [e.kind for e in events]
    assert kinds.index(EventKind.INPUT_REQUESTED) < kinds.index(EventKind.INPUT_ANSWERED)
    assert kinds.index(EventKind.INPUT_ANSWERED) < kinds.index(EventKind.TOOL_CALL_STARTED)
    assert '"sent": 5' in tool_answer(fake) or '"sent":5' in tool_answer(fake)

    # The same answer again: the same result, nothing runs twice.
    again, repeated = await app.operations.answer(
        op_id, data["request_id"], "a-1", APPROVE, "alice"
    )
    assert again is AnswerOutcome.ALREADY_ANSWERED
    assert repeated.request.answer_id == "a-1" and repeated.request.answer == APPROVE
    assert SendTool.runs == [{"to": "bob", "amount": 5}]


async def test_rejected_call_is_not_run_and_the_model_is_told(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    op_id, asked = await start_send(app, fake)
    reject = {"approved": False, "reason": "not to bob"}
    await app.operations.answer(op_id, asked.data["request_id"], "r-1", reject, "alice")
    events = await collect(app, op_id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert SendTool.runs == []
    told = tool_answer(fake)
    assert "rejected" in told and "not to bob" in told
    [failed] = [e for e in events if e.kind is EventKind.TOOL_CALL_FAILED]
    assert "not to bob" in failed.data["error"]


async def test_edited_arguments_are_the_ones_the_tool_receives(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    op_id, asked = await start_send(app, fake)
    edited = {"approved": True, "reason": "less", "arguments": {"to": "bob", "amount": 3}}
    await app.operations.answer(op_id, asked.data["request_id"], "e-1", edited, "alice")
    events = await collect(app, op_id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert SendTool.runs == [{"to": "bob", "amount": 3}]
    [started] = [e for e in events if e.kind is EventKind.TOOL_CALL_STARTED]
    assert started.data["arguments"] == {"to": "bob", "amount": 3}


async def test_edited_arguments_must_match_the_tool_schema(app: RuntimeApp, fake: FakeLLM) -> None:
    op_id, asked = await start_send(app, fake)
    bad = {"approved": True, "reason": "", "arguments": {"to": "bob", "amount": "lots"}}
    with pytest.raises(InvalidArgument) as raised:
        await app.operations.answer(op_id, asked.data["request_id"], "b-1", bad, "alice")
    assert raised.value.field == "answer.approval.arguments.amount"
    assert (await app.operations.get(op_id)).status is OperationStatus.WAITING
    # A free answer to an approval names the field too.
    with pytest.raises(InvalidArgument, match=r"answer\.approval"):
        await app.operations.answer(op_id, asked.data["request_id"], "b-2", {"value": 1}, "x")


async def test_racing_answers_one_wins_the_other_is_told_which(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    op_id, asked = await start_send(app, fake)
    request_id = asked.data["request_id"]
    answers = [
        ("approve-1", APPROVE),
        ("reject-1", {"approved": False, "reason": "no"}),
        ("approve-2", {"approved": True, "reason": "", "arguments": {"to": "eve", "amount": 9}}),
    ]
    results = await asyncio.gather(
        *(app.operations.answer(op_id, request_id, aid, a, "x") for aid, a in answers),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and won[0][0] is AnswerOutcome.ACCEPTED, results
    winner = won[0][1].request.answer_id
    assert len(refused) == 2
    for error in refused:
        assert isinstance(error, FailedPrecondition), error
        assert f'"{winner}" won' in str(error)
    events = await collect(app, op_id)
    assert events[-1].kind is EventKind.COMPLETED
    assert len(SendTool.runs) <= 1
    assert len([e for e in events if e.kind is EventKind.INPUT_ANSWERED]) == 1
    # Later answers keep naming the same winner.
    with pytest.raises(FailedPrecondition, match=winner):
        await app.operations.answer(op_id, request_id, "late", APPROVE, "x")


async def test_foreign_principal_gets_not_found(app: RuntimeApp, fake: FakeLLM) -> None:
    op_id, asked = await start_send(app, fake, owner="alice")
    request_id = asked.data["request_id"]
    with pytest.raises(NotFound) as raised:
        await app.operations.answer(op_id, request_id, "m-1", APPROVE, "mallory", "mallory")
    assert str(raised.value) == f"operation {op_id} does not exist"
    with pytest.raises(NotFound):
        await app.operations.pause(op_id, "mallory", "mallory")
    with pytest.raises(NotFound):
        await app.operations.resume(op_id, "mallory", "mallory")
    assert (await app.operations.get(op_id)).status is OperationStatus.WAITING
    # Unknown request ids say so.
    with pytest.raises(NotFound, match="no input request"):
        await app.operations.answer(op_id, "nope", "a-1", APPROVE, "alice", "alice")
    await app.operations.answer(op_id, request_id, "a-1", APPROVE, "alice", "alice")
    assert (await collect(app, op_id))[-1].kind is EventKind.COMPLETED


async def test_free_answer_checked_against_its_schema(app: RuntimeApp) -> None:
    op = (await app.operations.start("asker", {}, "")).operation
    asked = await waiting_request(app, op.id)
    assert asked.data["kind"] == "answer" and asked.data["schema"]["required"] == ["colour"]
    with pytest.raises(InvalidArgument) as raised:
        await app.operations.answer(op.id, asked.data["request_id"], "a", {"value": {}}, "x")
    assert raised.value.field == "answer.value"
    bad = {"value": {"colour": 7}}
    with pytest.raises(InvalidArgument) as raised:
        await app.operations.answer(op.id, asked.data["request_id"], "a", bad, "x")
    assert raised.value.field == "answer.value.colour"
    good = {"value": {"colour": "red"}}
    await app.operations.answer(op.id, asked.data["request_id"], "a", good, "x")
    events = await collect(app, op.id)
    assert events[-1].data["result"] == {"value": {"colour": "red"}, "expired": False}


async def test_expired_request_takes_its_default_and_resumes(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    input = {"expires_in": 0.3, "default": {"colour": "grey"}}
    op = (await app.operations.start("asker", input, "")).operation
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert events[-1].data["result"] == {"value": {"colour": "grey"}, "expired": True}
    [answered] = [e for e in events if e.kind is EventKind.INPUT_ANSWERED]
    assert answered.data["expired"] is True and answered.data["answered_by"] == "runtime"
    request_id = answered.data["request_id"]
    with pytest.raises(FailedPrecondition, match="expired"):
        await app.operations.answer(op.id, request_id, "late", {"value": {"colour": "x"}}, "x")


async def test_stop_while_waiting_ends_it_at_once_with_no_step(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    op_id, asked = await start_send(app, fake)
    result = await app.operations.interrupt(op_id, "alice", "changed my mind")
    assert result.operation.status is OperationStatus.INTERRUPTED
    events = await collect(app, op_id)
    after = [e.kind for e in events if e.seq > asked.seq]
    assert after == [EventKind.STOP_REQUESTED, EventKind.INTERRUPTED]
    assert SendTool.runs == []
    with pytest.raises(FailedPrecondition, match="INTERRUPTED"):
        await app.operations.answer(op_id, asked.data["request_id"], "a", APPROVE, "alice")


async def test_bulk_stop_ends_waiting_operations(app: RuntimeApp, fake: FakeLLM) -> None:
    op_id, _ = await start_send(app, fake, owner="alice")
    stopped = await app.operations.stop_matching("alice", "WAITING", "", {})
    assert stopped.operation_ids == (op_id,)
    assert (await app.operations.get(op_id)).status is OperationStatus.INTERRUPTED


async def test_pause_mid_step_then_resume_reruns_the_step(
    app: RuntimeApp, cut_once: CutOnceAgent
) -> None:
    op = (await app.operations.start("cut_once", {}, "")).operation
    await asyncio.wait_for(cut_once.hanging[op.id].wait(), 10)
    paused = await app.operations.pause(op.id, "ops")
    assert paused.outcome is PauseOutcome.ACCEPTED

    async def is_paused() -> bool:
        return (await app.operations.get(op.id)).status is OperationStatus.PAUSED

    await eventually(is_paused)
    # The PAUSED write commits before the run's task has finished its own cleanup.
    await asyncio.wait_for(app.runner.wait_finished(op.id), 10)
    assert op.id not in app.runner._runs
    again = await app.operations.pause(op.id, "ops")
    assert again.outcome is PauseOutcome.ALREADY_PAUSED
    records = await app.storage.step_records(op.id)
    assert [(r.step, r.attempt, r.outcome) for r in records] == [(0, 1, "paused")]

    resumed = await app.operations.resume(op.id, "ops")
    assert resumed.outcome is ResumeOutcome.ACCEPTED
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert cut_once.attempts[op.id] == 2
    records = await app.storage.step_records(op.id)
    assert [(r.step, r.attempt, r.outcome) for r in records] == [
        (0, 1, "paused"),
        (0, 2, "completed"),
        (1, 1, "completed"),
    ]
    kinds = [e.kind for e in events]
    assert EventKind.INTERRUPTED not in kinds
    assert kinds.count(EventKind.PAUSE_REQUESTED) == 1 and kinds.count(EventKind.PAUSED) == 1
    [paused_event] = [e for e in events if e.kind is EventKind.PAUSED]
    assert paused_event.data["mid_step"] is True
    again_resumed = await app.operations.resume(op.id, "ops")
    assert again_resumed.outcome is ResumeOutcome.ALREADY_FINISHED


async def test_pause_waiting_then_stop_ends_it(app: RuntimeApp, fake: FakeLLM) -> None:
    op_id, asked = await start_send(app, fake)
    paused = await app.operations.pause(op_id, "ops")
    assert paused.outcome is PauseOutcome.ACCEPTED
    assert paused.operation.status is OperationStatus.PAUSED
    # Answered while paused: recorded, but nothing runs until a resume.
    await app.operations.answer(op_id, asked.data["request_id"], "a", APPROVE, "alice")
    assert (await app.operations.get(op_id)).status is OperationStatus.PAUSED
    not_paused = await app.operations.resume(op_id, "ops")
    assert not_paused.operation.status is OperationStatus.PENDING or (
        not_paused.operation.status is not OperationStatus.PAUSED
    )
    events = await collect(app, op_id)
    assert events[-1].kind is EventKind.COMPLETED
    assert SendTool.runs == [{"to": "bob", "amount": 5}]

    # A stop while PAUSED ends it.
    op2, _ = await start_send(app, fake)
    await app.operations.pause(op2, "ops")
    result = await app.operations.interrupt(op2, "ops", "enough")
    assert result.operation.status is OperationStatus.INTERRUPTED


async def test_deadline_passes_while_waiting_ends_it(app: RuntimeApp) -> None:
    """No runner owns a waiting operation to arm its deadline: the sweep stops it."""
    op = (await app.operations.start("asker", {}, "", deadline_seconds=0.5)).operation
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED, events[-1]
    assert events[-1].data["cause"] == "DEADLINE_EXCEEDED"
    kinds = [e.kind for e in events]
    assert EventKind.INPUT_REQUESTED in kinds and EventKind.INPUT_ANSWERED not in kinds
