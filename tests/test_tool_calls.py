"""Structured events of a step on SQLite and PostgreSQL, driven in-process: token deltas
coalesced (and none lost to a stop), tool calls settled with exactly one ending each, blocking
tools killed on a stop, keep_on_stop and StepFailed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runtime_service import convert
from runtime_service.app import RuntimeApp
from runtime_service.domain import Event, EventKind, OperationStatus
from runtime_service.step_events import NO_RESULT, STOPPED_REASON
from runtime_service.tools import ToolLoadError, ToolRegistry
from stopline.events import TOOL_CALL_ENDINGS
from stopline.json_values import value_to_python
from tests.conftest import eventually, runtime_config
from tests.test_runner import collect, first_event
from tests.tool_agents import StreamingAgent, agent_registry, tool_registry


@pytest.fixture
def streaming() -> StreamingAgent:
    return StreamingAgent()


async def open_app(db_url: str, streaming: StreamingAgent, **settings: Any) -> RuntimeApp:
    return await RuntimeApp.open(
        runtime_config(db_url, **settings), agent_registry(streaming), tool_registry()
    )


@pytest.fixture
async def app(db_url: str, streaming: StreamingAgent) -> AsyncIterator[RuntimeApp]:
    opened = await open_app(db_url, streaming)
    try:
        yield opened
    finally:
        await opened.close()


async def run_to_end(app: RuntimeApp, agent: str, input: dict[str, Any]) -> list[Event]:
    op = (await app.operations.start(agent, input, "")).operation
    return await collect(app, op.id)


def calls_in(events: list[Event]) -> dict[str, list[Event]]:
    """Each call's records, in order, by call_id."""
    calls: dict[str, list[Event]] = {}
    for event in events:
        if event.kind is EventKind.TOOL_CALL_STARTED or event.kind in TOOL_CALL_ENDINGS:
            calls.setdefault(event.data["call_id"], []).append(event)
    return calls


def assert_settled_once(events: list[Event]) -> dict[str, list[Event]]:
    """Every started call has exactly one ending, after its start and before the end."""
    calls = calls_in(events)
    for call_id, records in calls.items():
        kinds = [r.kind for r in records]
        assert kinds[0] is EventKind.TOOL_CALL_STARTED, (call_id, kinds)
        assert len(kinds) == 2 and kinds[1] in TOOL_CALL_ENDINGS, (call_id, kinds)
        assert records[1].seq < events[-1].seq
    return calls


def deltas_text(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.kind is EventKind.TEXT_DELTA)


# ------------------------------------------------------------------------ token deltas


async def test_token_deltas_are_coalesced_into_few_events(app: RuntimeApp) -> None:
    events = await run_to_end(app, "deltas", {"count": 200})
    assert events[-1].kind is EventKind.COMPLETED
    written = [e for e in events if e.kind is EventKind.TEXT_DELTA]
    assert 1 <= len(written) <= 10, f"{len(written)} events for 200 deltas"
    assert deltas_text(events) == "".join(f"t{i} " for i in range(200))
    # Flushed before the step's next event: every delta precedes the output emitted after it.
    chunk = next(e for e in events if e.kind is EventKind.OUTPUT_CHUNK)
    assert all(e.seq < chunk.seq for e in written)


async def test_deltas_streamed_over_time_are_written_per_flush_window(app: RuntimeApp) -> None:
    # 200 deltas a millisecond or more apart: about one event per 50 ms window, not per delta.
    events = await run_to_end(app, "deltas", {"count": 200, "pause": 0.001})
    assert events[-1].kind is EventKind.COMPLETED
    written = [e for e in events if e.kind is EventKind.TEXT_DELTA]
    assert 2 <= len(written) <= 100, f"{len(written)} events for 200 deltas"
    assert deltas_text(events) == "".join(f"t{i} " for i in range(200))


async def test_a_stop_mid_stream_keeps_every_delta_passed_before_it(
    db_url: str, streaming: StreamingAgent
) -> None:
    # A long flush window: whatever was passed is still buffered when the stop reaches the step.
    app = await open_app(db_url, streaming, delta_flush_seconds=30.0)
    try:
        op = (await app.operations.start("streaming", {}, "")).operation
        await asyncio.wait_for(streaming.streaming[op.id].wait(), 10)
        await app.operations.interrupt(op.id, "test", "enough")
        events = await collect(app, op.id)
        assert events[-1].kind is EventKind.INTERRUPTED and events[-1].data["mid_step"]
        passed = "".join(streaming.passed[op.id])
        assert len(passed) > 0 and deltas_text(events) == passed
        stored = await app.operations.get(op.id)
        assert stored.status is OperationStatus.INTERRUPTED
        assert stored.agent_state == {"partial": passed}  # what keep_on_stop kept last
    finally:
        await app.close()


# ------------------------------------------------------------------------ tool calls


async def test_tool_calls_end_finished_or_failed_exactly_once(app: RuntimeApp) -> None:
    calls = [
        {"name": "sleep", "arguments": {"seconds": 0}},
        {"name": "sleep", "arguments": {"seconds": "soon"}},  # wrong type
        {"name": "python", "arguments": {"cod": "1"}},  # misspelt, missing `code`
        {"name": "sleep", "arguments": '{"seconds": 0'},  # malformed JSON text from a model
        {"name": "boom", "arguments": {}},  # the tool raises
        {"name": "no_such_tool", "arguments": {}},
        {"name": "python", "arguments": '{"code": "print(6 * 7)\\nresult = [1, 2]"}'},
    ]
    events = await run_to_end(app, "tools", {"calls": calls})
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    settled = assert_settled_once(events)
    endings = [records[1] for records in settled.values()]
    assert [e.kind for e in endings] == [
        EventKind.TOOL_CALL_FINISHED,
        *[EventKind.TOOL_CALL_FAILED] * 5,
        EventKind.TOOL_CALL_FINISHED,
    ]
    errors = [e.data.get("error", "") for e in endings]
    assert errors[1].startswith("arguments.seconds:") and "'soon'" in errors[1]
    assert errors[2].startswith("arguments:") and "code" in errors[2]
    assert "not valid JSON" in errors[3]
    assert errors[4] == "ValueError: boom: the tool broke"
    assert "no_such_tool" in errors[5]
    assert endings[0].data["result"] == {"slept_seconds": 0}
    assert endings[6].data["result"] == {"output": "42\n", "result": [1, 2]}
    started = [records[0] for records in settled.values()]
    assert started[3].data["arguments"] == '{"seconds": 0'  # recorded as the model sent it
    # The python tool's printed line streamed as progress while it ran, before its ending.
    progress = [e for e in events if e.kind is EventKind.OUTPUT_CHUNK]
    assert [e.data["text"] for e in progress] == ["42"] and progress[0].seq < endings[6].seq
    outcomes = events[-1].data["result"]
    assert [o["ok"] for o in outcomes] == [True, False, False, False, False, False, True]


@pytest.mark.parametrize(
    ("how", "ending", "error", "status", "op_error"),
    [
        ("finish", EventKind.TOOL_CALL_FINISHED, None, OperationStatus.COMPLETED, None),
        ("none", EventKind.TOOL_CALL_FAILED, NO_RESULT, OperationStatus.COMPLETED, None),
        (
            "raise",
            EventKind.TOOL_CALL_FAILED,
            "RuntimeError: the agent broke mid-call",
            OperationStatus.FAILED,
            "RuntimeError: the agent broke mid-call",
        ),
        (
            "raise_surrogate",
            EventKind.TOOL_CALL_FAILED,
            "RuntimeError: the model said \\ud83d",  # stored, escaped
            OperationStatus.FAILED,
            "RuntimeError: the model said \\ud83d",
        ),
        (
            "step_failed",
            EventKind.TOOL_CALL_FAILED,
            "StepFailed: the model refused: content policy",
            OperationStatus.FAILED,
            "the model refused: content policy",  # exactly the message, no type or traceback
        ),
    ],
)
async def test_a_tool_call_by_hand_ends_once_however_the_agent_leaves_it(
    app: RuntimeApp,
    how: str,
    ending: EventKind,
    error: str | None,
    status: OperationStatus,
    op_error: str | None,
) -> None:
    events = await run_to_end(app, "tools", {"manual": how})
    settled = assert_settled_once(events)
    assert list(settled) == ["manual-1"]
    end = settled["manual-1"][1]
    assert end.kind is ending and end.data.get("error") == error
    stored = await app.operations.get(events[0].operation_id)
    assert stored.status is status and stored.error == op_error


async def test_a_stop_cancels_the_tool_call_in_flight_before_the_halt(app: RuntimeApp) -> None:
    op = (await app.operations.start("tools", {"calls": [{"name": "wait"}]}, "")).operation
    await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
    await app.operations.interrupt(op.id, "test", "stop the tool")
    events = await collect(app, op.id)
    settled = assert_settled_once(events)
    [(_, end)] = settled.values()
    assert end.kind is EventKind.TOOL_CALL_CANCELLED and end.data["reason"] == STOPPED_REASON
    kinds = [e.kind for e in events]
    assert kinds.index(EventKind.STOP_REQUESTED) < end.seq - 1 < kinds.index(EventKind.INTERRUPTED)
    assert events[-1].kind is EventKind.INTERRUPTED and events[-1].data["mid_step"]
    stored = await app.operations.get(op.id)
    assert stored.agent_state == {"kept": "for a stop"}  # keep_on_stop, stored by the halt
    shown = convert.operation_to_pb(stored).state
    assert value_to_python(shown) == {"kept": "for a stop"}  # Operation.state on the wire


async def test_a_call_the_agent_will_not_leave_is_settled_by_the_runtime_once(
    app: RuntimeApp,
) -> None:
    op = (await app.operations.start("stubborn_tool", {}, "")).operation
    await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 10)
    await app.operations.interrupt(op.id, "test", "stop ignoring me")
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED
    [(_, end)] = assert_settled_once(events).values()
    assert end.kind is EventKind.TOOL_CALL_CANCELLED
    await app.runner.shutdown()  # cancels the abandoned step again: its exit must add nothing
    assert await app.storage.events_after(op.id, 0) == events


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_blocking_tool_spinning_forever_is_killed_on_a_stop(app: RuntimeApp) -> None:
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n"
    calls = [{"name": "python", "arguments": {"code": code, "timeout_seconds": 600}}]
    op = (await app.operations.start("tools", {"calls": calls}, "")).operation
    printed = await asyncio.wait_for(first_event(app, op.id, EventKind.OUTPUT_CHUNK), 30)
    pid = int(printed.data["text"])
    assert not pid_gone(pid)
    await app.operations.interrupt(op.id, "test", "runaway code")
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED
    [(_, end)] = assert_settled_once(events).values()
    assert end.kind is EventKind.TOOL_CALL_CANCELLED

    async def gone() -> bool:
        return pid_gone(pid)

    await eventually(gone, timeout=20)


def test_tool_specs_and_loading_errors() -> None:
    registry = tool_registry()
    [python] = registry.specs(["python"])
    assert python.parameters["required"] == ["code"] and not python.needs_approval
    assert {"python", "sleep", "boom", "wait"} <= {spec.name for spec in registry.specs()}
    with pytest.raises(KeyError, match="nope"):
        registry.specs(["nope"])
    with pytest.raises(ToolLoadError, match=r"must look like name=package\.module:attr"):
        ToolRegistry.load(["just-a-name"], use_entry_points=False)
    with pytest.raises(ToolLoadError, match="is not a tool"):
        ToolRegistry.load(["x=tests.tool_agents:ToolAgent"], use_entry_points=False)
    with pytest.raises(ToolLoadError, match="not a valid JSON schema"):
        ToolRegistry.load(["x=tests.tool_agents:BadSchemaTool"], use_entry_points=False)
