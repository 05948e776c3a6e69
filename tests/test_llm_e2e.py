"""The `llm` agent end to end through the real runtime (and the gateway), on SQLite and
PostgreSQL, against the project's local OpenAI-compatible server: a stop mid-stream closes the
model's HTTP connection and keeps a conversation the next turn can use; a stop during a tool
call settles it cancelled; provider errors are retried or fail naming the cause; malformed tool
arguments fail that call only; a runaway `python` tool the model asked for is killed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from fake_llm import FakeLLM
from fake_llm.script import ErrorTurn, RequestRecord, TextTurn, ToolCall, ToolCallsTurn, Turn
from fake_llm.server import ServerConfig
from gateway_service.server import start_gateway
from runtime_service.agents.llm_messages import CANCELLED_BY_STOP
from runtime_service.app import RuntimeApp
from runtime_service.config import LLMSettings
from runtime_service.domain import Event, EventKind, Operation, OperationStatus
from runtime_service.server import start_runtime
from stopline.events import TOOL_CALL_ENDINGS
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.json_values import value_to_python
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.conftest import eventually, runtime_config
from tests.credentials import gateway_channel, runtime_sync_channel
from tests.processes import RuntimeProcess, ServiceProcess, fake_llm_process, owner_of
from tests.test_gateway import gateway_config, start_request
from tests.test_replicas import assert_gap_free
from tests.test_runner import collect
from tests.test_tool_calls import assert_settled_once, deltas_text, pid_gone
from tests.test_tool_faults import wait_for_log

API_KEY = "sk-test-e2e-0123456789"
ANSWER = (
    "Stopping a model mid answer must close its stream at once, keep the words already "
    "written, and leave a conversation that the next turn can continue without any complaint "
    "from the provider about what came before."
)
USER = {"role": "user", "content": "Tell me about stopping."}


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM(ServerConfig(tokens_per_second=0, api_key=API_KEY))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def llm_settings(fake: FakeLLM, **changes: Any) -> LLMSettings:
    settings: dict[str, Any] = {
        "base_url": fake.base_url,
        "api_key": API_KEY,
        "model": "fake-model",
        "max_retries": 2,
    }
    settings.update(changes)
    return LLMSettings(**settings)


async def open_runtime(db_url: str, fake: FakeLLM, **llm: Any) -> RuntimeApp:
    return await RuntimeApp.open(runtime_config(db_url, llm=llm_settings(fake, **llm)))


@pytest.fixture
async def app(db_url: str, fake: FakeLLM) -> AsyncIterator[RuntimeApp]:
    opened = await open_runtime(db_url, fake)
    try:
        yield opened
    finally:
        await opened.close()


async def start(app: RuntimeApp, input: dict[str, Any]) -> Operation:
    return (await app.operations.start("llm", input, "")).operation


async def events_of(app: RuntimeApp, op_id: str) -> list[Event]:
    return await app.storage.events_after(op_id, 0)


async def wait_for_text(app: RuntimeApp, op_id: str, words: int) -> str:
    """Wait until at least `words` streamed words are stored as text_delta events."""

    async def enough() -> str | None:
        text = deltas_text(await events_of(app, op_id))
        return text if len(text.split()) >= words else None

    return await eventually(enough, timeout=20)


async def client_closed(fake: FakeLLM) -> RequestRecord:
    async def closed() -> RequestRecord | None:
        return next((r for r in fake.requests if r.outcome == "client_closed"), None)

    return await eventually(closed, timeout=10)


async def next_turn_completes(app: RuntimeApp, fake: FakeLLM, messages: list[Any]) -> None:
    """The saved conversation plus a user message is a valid request for the provider."""
    fake.set_script([TextTurn(text="Continuing from there.")])
    seen = len(fake.requests)
    op = await start(app, {"messages": [*messages, {"role": "user", "content": "Go on."}]})
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert events[-1].data["result"] == "Continuing from there."
    [request] = fake.requests[seen:]
    assert request.status == 200 and request.outcome == "completed", request
    assert request.message_count == len(messages) + 1


def kept_messages(op: Operation) -> list[dict[str, Any]]:
    assert isinstance(op.agent_state, dict)
    messages = op.agent_state["messages"]
    assert isinstance(messages, list)
    return messages


# ------------------------------------------------------------------------ a stop mid-stream


async def test_a_stop_mid_stream_closes_the_connection_and_keeps_the_partial_answer(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    fake.set_script([TextTurn(text=ANSWER, tokens_per_second=20)])
    op = await start(app, {"messages": [USER]})
    await wait_for_text(app, op.id, 3)
    await app.operations.interrupt(op.id, "test", "enough")
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED and events[-1].data["mid_step"], events[-1]

    # The model's HTTP connection was closed, long before the answer would have ended (~2 s).
    record = await client_closed(fake)
    assert 0 < record.tokens_sent < len(ANSWER.split())

    partial = deltas_text(events)
    assert partial and ANSWER.startswith(partial) and partial != ANSWER
    stored = await app.operations.get(op.id)
    assert stored.status is OperationStatus.INTERRUPTED
    messages = kept_messages(stored)
    assert messages == [USER, {"role": "assistant", "content": partial}]
    await next_turn_completes(app, fake, messages)


async def test_a_stop_through_the_gateway_closes_the_model_stream(
    db_url: str, fake: FakeLLM
) -> None:
    """The path a client takes: StartAndStream, StopOperation; the gateway streams the deltas
    and the interruption, and Operation.state carries the conversation to continue."""
    fake.set_script([TextTurn(text=ANSWER, tokens_per_second=20)])
    runtime = await start_runtime(runtime_config(db_url, llm=llm_settings(fake)))
    gateway = await start_gateway(gateway_config(runtime.address))
    try:
        async with gateway_channel(gateway.address) as channel:
            stub = pb_grpc.GatewayServiceStub(channel)
            call = stub.StartAndStream(start_request("llm", {"messages": [USER]}))
            op_id, texts, final, stopped = "", [], None, False
            async for update in call:
                if update.HasField("accepted"):
                    op_id = update.accepted.operation_id
                    continue
                kind = update.event.WhichOneof("kind")
                if kind == "text_delta":
                    texts.append(update.event.text_delta.text)
                    if not stopped and len("".join(texts).split()) >= 3:
                        stopped = True
                        await stub.StopOperation(
                            pb.StopOperationRequest(operation_id=op_id, reason="enough"),
                            timeout=10,
                        )
                if kind in ("completed", "failed", "interrupted"):
                    final = update.event
                    break
            assert final is not None and final.WhichOneof("kind") == "interrupted", final
            assert final.interrupted.mid_step
            await client_closed(fake)
            partial = "".join(texts)
            assert partial and ANSWER.startswith(partial) and partial != ANSWER
            got = await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=10)
            state = value_to_python(got.operation.state)
            assert state == {"messages": [USER, {"role": "assistant", "content": partial}]}
    finally:
        await gateway.stop(grace=0)
        await runtime.stop(grace=0)


# ------------------------------------------------------------------------ a stop during a tool call


async def test_a_stop_during_a_tool_call_cancels_it_and_the_next_turn_is_accepted(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    fake.set_script(
        [
            ToolCallsTurn(
                text="Let me wait.",
                calls=(ToolCall("sleep", '{"seconds": 600}', id="call_nap"),),
            )
        ]
    )
    op = await start(app, {"messages": [USER], "tools": ["sleep"]})

    async def started() -> bool:
        kinds = [e.kind for e in await events_of(app, op.id)]
        return EventKind.TOOL_CALL_STARTED in kinds

    await eventually(started, timeout=20)
    await app.operations.interrupt(op.id, "test", "too long")
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED and events[-1].data["mid_step"]
    settled = assert_settled_once(events)
    assert list(settled) == ["call_nap"]
    start_record, end = settled["call_nap"]
    assert start_record.data["name"] == "sleep" and start_record.data["arguments"] == {
        "seconds": 600
    }
    assert end.kind is EventKind.TOOL_CALL_CANCELLED

    messages = kept_messages(await app.operations.get(op.id))
    assert messages[-1] == {
        "role": "tool",
        "tool_call_id": "call_nap",
        "content": CANCELLED_BY_STOP,
    }
    assert messages[-2]["tool_calls"][0]["id"] == "call_nap"
    await next_turn_completes(app, fake, messages)


# ------------------------------------------------------------------------ provider errors


async def test_a_429_is_retried_and_the_operation_completes(app: RuntimeApp, fake: FakeLLM) -> None:
    fake.set_script([ErrorTurn(status=429, retry_after=0.05), TextTurn(text="Fine now.")])
    op = await start(app, {"messages": [USER]})
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert events[-1].data["result"] == "Fine now."
    assert [r.status for r in fake.requests] == [429, 200]
    assert not any(e.kind is EventKind.FAILED for e in events)


async def test_a_401_fails_the_operation_naming_the_cause(db_url: str, fake: FakeLLM) -> None:
    app = await open_runtime(db_url, fake, api_key="sk-wrong-key-000000")
    try:
        op = await start(app, {"messages": [USER]})
        events = await collect(app, op.id)
        assert events[-1].kind is EventKind.FAILED, events[-1]
        error = events[-1].data["error"]
        assert "401" in error and "API key" in error and "Incorrect API key" in error, error
        assert "Traceback" not in error and "sk-wrong-key-000000" not in error
        stored = await app.operations.get(op.id)
        assert stored.status is OperationStatus.FAILED and stored.error == error
        assert [r.status for r in fake.requests] == [401]  # not retried
    finally:
        await app.close()


# ------------------------------------------------------------------------ malformed tool arguments


async def test_malformed_tool_arguments_fail_that_call_only(app: RuntimeApp, fake: FakeLLM) -> None:
    script: list[Turn] = [
        ToolCallsTurn(
            calls=(
                ToolCall("sleep", '{"seconds": 0', id="call_bad"),
                ToolCall("sleep", '{"seconds": 0}', id="call_good"),
            )
        ),
        TextTurn(text="One of them worked."),
    ]
    fake.set_script(script)
    op = await start(app, {"messages": [USER], "tools": ["sleep"]})
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.COMPLETED, events[-1]
    assert events[-1].data["result"] == "One of them worked."
    settled = assert_settled_once(events)
    assert settled["call_bad"][1].kind is EventKind.TOOL_CALL_FAILED
    assert "not valid JSON" in settled["call_bad"][1].data["error"]
    assert settled["call_good"][1].kind is EventKind.TOOL_CALL_FINISHED
    # The model was told which call failed and why, in the conversation it read next.
    last = fake.requests[-1]
    tool_answers = {m["tool_call_id"]: m["content"] for m in last.messages if m["role"] == "tool"}
    assert tool_answers["call_bad"].startswith("error:") and "JSON" in tool_answers["call_bad"]
    assert not tool_answers["call_good"].startswith("error:")


# ------------------------------------------------------------------------ a runaway python tool


async def test_a_runaway_python_tool_the_model_asked_for_is_killed_on_a_stop(
    app: RuntimeApp, fake: FakeLLM
) -> None:
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n"
    arguments = json.dumps({"code": code, "timeout_seconds": 600})
    fake.set_script([ToolCallsTurn(calls=(ToolCall("python", arguments, id="call_spin"),))])
    op = await start(app, {"messages": [USER], "tools": ["python"]})

    async def printed_pid() -> int | None:
        chunks = [e for e in await events_of(app, op.id) if e.kind is EventKind.OUTPUT_CHUNK]
        return int(chunks[0].data["text"]) if chunks else None

    pid = await eventually(printed_pid, timeout=30)
    assert not pid_gone(pid)
    await app.operations.interrupt(op.id, "test", "runaway code")
    events = await collect(app, op.id)
    assert events[-1].kind is EventKind.INTERRUPTED and events[-1].data["mid_step"]
    assert assert_settled_once(events)["call_spin"][1].kind is EventKind.TOOL_CALL_CANCELLED

    async def gone() -> bool:
        return pid_gone(pid)

    await eventually(gone, timeout=20)
    messages = kept_messages(await app.operations.get(op.id))
    assert messages[-1]["tool_call_id"] == "call_spin"


# ------------------------------------------------------------------------ kill -9 mid-tool


@pytest.fixture
def fake_process(tmp_path: Path) -> Iterator[str]:
    """`python -m fake_llm` in a subprocess (the runtimes are processes too, and this test's
    own thread blocks on them): its base URL; /_fake/requests has what it saw."""
    script = [
        {
            "kind": "tool_calls",
            "calls": [{"name": "sleep", "arguments": '{"seconds": 600}', "id": "call_nap"}],
        },
        {"kind": "text", "text": "Done."},
    ]
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    with fake_llm_process(path) as base_url:
        yield base_url


def fake_requests(base_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_fake/requests") as answer:
        requests: list[dict[str, Any]] = json.load(answer)["requests"]
    return requests


def test_runtime_killed_mid_tool_call_the_llm_agent_asked_for(
    db_url: str, tmp_path: Path, fake_process: str, processes: list[ServiceProcess]
) -> None:
    """kill -9 while the model's `sleep` call runs: on resume the call is settled outcome
    unknown before the step runs again; the rerun does not run it again under the same id (it
    may have taken effect): the model is told its outcome is unknown, and answers."""
    postgres = db_url.startswith("postgresql")
    # A 3 s lease: with 1 s, a loaded machine's stall let the other replica take the operation
    # over before the kill (a second `started`), and the model never asked for the tool again.
    args = ("--lease-seconds", "3", "--poll-seconds", "0.1", "--llm-base-url", fake_process)
    first = RuntimeProcess(db_url, tmp_path, extra_args=args)
    processes.append(first)
    if postgres:  # a second replica, there all along, takes over once the lease lapses
        processes.append(RuntimeProcess(db_url, tmp_path, extra_args=args))
    value = struct_pb2.Struct()
    value.update({"messages": [USER], "tools": ["sleep"]})
    with runtime_sync_channel(first.address) as channel:
        started = rt_grpc.RuntimeServiceStub(channel).StartOperation(
            rt_pb.StartOperationRequest(agent="llm", input=value), timeout=10
        )
    op_id = started.operation.id
    wait_for_log(db_url, op_id, lambda kinds: "tool_call_started" in kinds)
    owner = owner_of(processes, db_url, op_id)  # the other replica may have claimed it first
    owner.kill()
    if not postgres:
        processes.append(RuntimeProcess(db_url, tmp_path, port=owner.port, extra_args=args))
    log = wait_for_log(db_url, op_id, lambda kinds: kinds[-1] in ("interrupted", "completed"))
    kinds = [kind for _, kind, _ in log]
    assert kinds[-1] == "completed", kinds
    records: dict[str, list[str]] = {}
    for _, kind, data in log:
        if kind == "tool_call_started" or kind in TOOL_CALL_ENDINGS:
            records.setdefault(data["call_id"], []).append(kind)
    assert records == {"call_nap": ["tool_call_started", "tool_call_outcome_unknown"]}, kinds
    unknown = kinds.index("tool_call_outcome_unknown")
    reruns = [i for i, kind in enumerate(kinds) if kind == "step_started"]
    assert len(reruns) == 4 and reruns[1] < unknown < reruns[2], kinds  # step 1, twice
    last = fake_requests(fake_process)[-1]
    answer = next(m for m in last["messages"] if m["role"] == "tool")
    assert answer["tool_call_id"] == "call_nap" and "outcome" in answer["content"]
    assert "unknown" in answer["content"]
    assert_gap_free(db_url)
