"""The built-in `llm` agent's steps, driven directly with a recording StepContext double against
an in-process fake_llm server (the end-to-end tests through the runtime are elsewhere)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from fake_llm import ErrorTurn, FakeLLM, RequestRecord, ServerConfig, TextTurn, ToolCall
from fake_llm import ToolCallsTurn as CallsTurn
from runtime_service.agents.base import Answered, InvalidInput, StepFailed, StepResult
from runtime_service.agents.llm import LLMAgent
from runtime_service.agents.llm_messages import CANCELLED_BY_STOP
from runtime_service.agents.registry import AgentRegistry
from runtime_service.config import LLMSettings, RuntimeConfig
from runtime_service.domain import JSONValue
from tests.conftest import eventually
from tests.processes import stopline_command

USER = [{"role": "user", "content": "hello"}]
KEY = "sk-test-secret-key"

Tool = Callable[[dict[str, Any]], Awaitable[JSONValue]]


# --- the StepContext double: the issue-13 API, recording what the agent does ----------------


@dataclass(frozen=True)
class Outcome:
    call_id: str
    ok: bool
    result: JSONValue = None
    error: str | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    parameters: dict[str, Any]
    needs_approval: bool = False


@dataclass
class Call:
    """One recorded tool call: started, then exactly one terminal status."""

    call_id: str
    name: str
    arguments: JSONValue
    status: str = "started"
    result: JSONValue = None
    error: str | None = None

    def finish(self, result: JSONValue) -> None:
        self.status, self.result = "finished", result

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error


@dataclass
class FakeContext:
    input: dict[str, Any]
    state: JSONValue = None
    step: int = 0
    tools: dict[str, Tool] = field(default_factory=dict)
    deltas: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    kept: JSONValue = None
    unknown_calls: frozenset[str] = frozenset()
    answer: Answered | None = None
    # Awaited inside delta() after recording, e.g. to hold the agent there.
    on_delta: Callable[[int], Awaitable[None]] | None = None

    async def delta(self, text: str) -> None:
        self.deltas.append(text)
        if self.on_delta is not None:
            await self.on_delta(len(self.deltas))

    @asynccontextmanager
    async def tool_call(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> AsyncIterator[Call]:
        call = Call(call_id or f"call_{len(self.calls)}", name, arguments)
        self.calls.append(call)
        try:
            yield call
        except asyncio.CancelledError:
            call.status = "cancelled"
            raise
        except Exception as exc:
            call.fail(str(exc))
            raise
        if call.status == "started":
            call.fail("the tool call ended without a result")

    async def call_tool(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> Outcome:
        async with self.tool_call(name, arguments, call_id) as call:
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError as exc:
                    call.fail(f"the arguments are not valid JSON: {exc}")
            if call.status == "started" and not isinstance(arguments, dict):
                call.fail("the arguments must be a JSON object")
            if call.status == "started":
                call.finish(await self.tools[name](cast(dict[str, Any], arguments)))
        if call.status == "finished":
            return Outcome(call.call_id, True, call.result)
        return Outcome(call.call_id, False, error=call.error)

    def tool_specs(self, names: Sequence[str] | None = None) -> list[Spec]:
        return [Spec(n, f"the {n} tool", {"type": "object"}) for n in (names or sorted(self.tools))]

    def keep_on_stop(self, state: JSONValue) -> None:
        self.kept = copy.deepcopy(state)


async def _add(args: dict[str, Any]) -> JSONValue:
    return {"sum": args["a"] + args["b"]}


async def _shout(args: dict[str, Any]) -> JSONValue:
    return str(args["text"]).upper()


TOOLS: dict[str, Tool] = {"add": _add, "shout": _shout}


async def run_steps(
    agent: LLMAgent, input: dict[str, Any], tools: dict[str, Tool] | None = None, limit: int = 10
) -> tuple[StepResult, list[FakeContext]]:
    """Step the agent the way the runner does (state from one step into the next) until done."""
    state: JSONValue = None
    contexts = []
    for step in range(limit):
        ctx = FakeContext(input, state, step, tools if tools is not None else TOOLS)
        contexts.append(ctx)
        result = await agent.step(ctx)
        if result.done:
            return result, contexts
        state = result.state
    raise AssertionError("the agent did not finish")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM(ServerConfig(tokens_per_second=0, api_key=KEY))
    await server.start()
    yield server
    await server.stop()


def settings(fake: FakeLLM, **changes: Any) -> LLMSettings:
    values: dict[str, Any] = {
        "base_url": fake.base_url,
        "api_key": KEY,
        "model": "fake-default",
        "max_retries": 0,
    }
    return LLMSettings(**{**values, **changes})


@pytest.fixture(params=["aiohttp", "httpx2"])
def transport(request: pytest.FixtureRequest) -> str:
    """Both HTTP clients the agent can run the SDK on (aiohttp, the default; httpx2, the SDK's
    own): stops, errors and retries must read the same on either."""
    value: str = request.param
    return value


@pytest.fixture
async def agent(fake: FakeLLM, transport: str) -> AsyncIterator[LLMAgent]:
    made = LLMAgent(settings(fake, http_transport=transport))
    yield made
    await made.aclose()


async def accepted_next_turn(fake: FakeLLM, messages: list[Any]) -> RequestRecord:
    """POST a next turn (the kept conversation plus a new user message) through the SDK; the
    fake validates it like the real API (400 for a tool call without an answer)."""
    fake.set_script([TextTurn(text="ok")])
    async with AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as client:
        turn = [*messages, {"role": "user", "content": "go on"}]
        await client.chat.completions.create(
            model="m", messages=cast(list[ChatCompletionMessageParam], turn)
        )
    record = fake.requests[-1]
    assert record.outcome == "completed", record.error
    return record


# --- streaming and tool calls --------------------------------------------------------------


async def test_streamed_text_arrives_as_deltas(fake: FakeLLM, agent: LLMAgent) -> None:
    fake.set_script([TextTurn(text="The quick brown fox jumps.")])
    ctx = FakeContext({"messages": USER, "temperature": 0.5})
    result = await agent.step(ctx)
    assert ctx.deltas == ["The", " quick", " brown", " fox", " jumps."]
    assert result.done and result.output == "The quick brown fox jumps."
    assert result.state == {
        "messages": [*USER, {"role": "assistant", "content": "The quick brown fox jumps."}]
    }
    (request,) = fake.requests
    assert request.stream and request.model == "fake-default" and request.messages == USER
    assert KEY not in json.dumps([result.state, result.output, ctx.kept, ctx.deltas])


async def test_tool_calls_run_with_the_models_ids(fake: FakeLLM, agent: LLMAgent) -> None:
    fake.set_script(
        [
            CallsTurn(
                text="Let me see.",
                calls=(
                    ToolCall("add", '{"a": 2, "b": 3}', id="call_add"),
                    ToolCall("shout", '{"text": "hi"}', id="call_shout"),
                ),
                argument_chunk=3,
            ),
            TextTurn(text="The sum is 5."),
        ]
    )
    result, contexts = await run_steps(
        agent, {"messages": USER, "tools": ["add", "shout"], "model": "m2"}
    )
    model_step, tool_step, final_step = contexts
    assert model_step.deltas == ["Let", " me", " see."] and model_step.calls == []
    assert [(c.call_id, c.name, c.arguments, c.status, c.result) for c in tool_step.calls] == [
        ("call_add", "add", {"a": 2, "b": 3}, "finished", {"sum": 5}),
        ("call_shout", "shout", {"text": "hi"}, "finished", "HI"),
    ]
    assert result.output == "The sum is 5."
    assert isinstance(result.state, dict)
    messages = result.state["messages"]
    assert messages[1]["tool_calls"][0] == {
        "id": "call_add",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    }
    assert messages[1]["content"] == "Let me see."
    assert messages[2:4] == [
        {"role": "tool", "tool_call_id": "call_add", "content": '{"sum":5}'},
        {"role": "tool", "tool_call_id": "call_shout", "content": "HI"},
    ]
    assert messages[4] == {"role": "assistant", "content": "The sum is 5."}
    # The second model call carried the tool answers and was accepted by the API's rules.
    assert [r.outcome for r in fake.requests] == ["completed", "completed"]
    assert fake.requests[1].messages == messages[:4] and fake.requests[1].model == "m2"
    assert final_step.deltas == ["The", " sum", " is", " 5."]


async def test_malformed_arguments_fail_that_call_only(fake: FakeLLM, agent: LLMAgent) -> None:
    fake.set_script(
        [
            CallsTurn(
                calls=(
                    ToolCall("add", '{"a": 1, "b":', id="call_bad"),
                    ToolCall("add", '{"a": 1, "b": 1}', id="call_good"),
                    ToolCall("rm_rf", "{}", id="call_unknown"),
                )
            ),
            TextTurn(text="Sorry, let me retry."),
        ]
    )
    result, (_, tool_step, _) = await run_steps(agent, {"messages": USER, "tools": ["add"]})
    bad, good, unknown = tool_step.calls
    assert bad.status == "failed" and bad.error is not None and "not valid JSON" in bad.error
    assert good.status == "finished" and good.result == {"sum": 2}
    assert unknown.status == "failed" and unknown.error is not None
    assert "no tool named" in unknown.error and "available: add" in unknown.error
    assert result.done and result.output == "Sorry, let me retry."
    answers = fake.requests[1].messages[2:]
    assert answers[0] == {
        "role": "tool",
        "tool_call_id": "call_bad",
        "content": f"error: {bad.error}",
    }
    assert answers[1]["content"] == '{"sum":2}'
    assert answers[2]["content"].startswith("error: there is no tool named")
    assert fake.requests[1].outcome == "completed"  # the API's validation accepted it


async def test_max_steps_bounds_the_loop(fake: FakeLLM, agent: LLMAgent) -> None:
    """Model calls stop at the bound; tool calls already asked for are answered first, so the
    last checkpoint is a conversation the API accepts for a next turn."""
    again = CallsTurn(calls=(ToolCall("add", '{"a": 1, "b": 1}'),))
    fake.set_script([again, again, again])
    input = {"messages": USER, "tools": ["add"], "max_steps": 3}
    state: JSONValue = None
    for step in range(4):  # model, tools, model, tools (past the bound: answers the calls)
        state = (await agent.step(FakeContext(input, state, step, TOOLS))).state
    with pytest.raises(StepFailed, match=r"max_steps \(3\) without a final answer"):
        await agent.step(FakeContext(input, state, 4, TOOLS))
    assert len(fake.requests) == 2
    assert isinstance(state, dict)
    await accepted_next_turn(fake, state["messages"])


# --- stops ---------------------------------------------------------------------------------


async def _closed(fake: FakeLLM) -> RequestRecord | None:
    record = fake.requests[-1]
    return record if record.client_closed_at is not None else None


@pytest.mark.parametrize("where", ["reading", "in_delta"])
async def test_stop_mid_stream_closes_the_connection_and_keeps_the_partial_text(
    fake: FakeLLM, agent: LLMAgent, where: str
) -> None:
    """`reading`: the task waits in the SDK for the next token; `in_delta`: it waits in the
    runtime's delta() (the case only `async with stream:` covers)."""
    fake.set_script([TextTurn(tokens=1000, tokens_per_second=20)])
    three = asyncio.Event()
    hold = asyncio.Event()  # never set: in_delta holds the agent inside delta()

    async def on_delta(count: int) -> None:
        if count == 3:
            three.set()
            if where == "in_delta":
                await hold.wait()

    ctx = FakeContext({"messages": USER}, on_delta=on_delta)
    task = asyncio.create_task(agent.step(ctx))
    await asyncio.wait_for(three.wait(), 10)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await eventually(lambda: _closed(fake), timeout=5)
    assert record.outcome == "client_closed" and record.client_closed_at is not None
    # Seen by the server before even a few more tokens (20/s) would have gone out.
    assert record.tokens_sent < len(ctx.deltas) + 5
    print(
        f"cancel -> server saw the close: {(record.client_closed_at - cancelled_at) * 1000:.1f} ms"
    )
    partial = "".join(ctx.deltas)
    assert len(ctx.deltas) >= 3
    assert ctx.kept == {"messages": [*USER, {"role": "assistant", "content": partial}]}
    next_turn = await accepted_next_turn(fake, ctx.kept["messages"])
    assert next_turn.messages[1] == {"role": "assistant", "content": partial}


async def test_stop_while_a_tool_call_streams_keeps_no_half_call(
    fake: FakeLLM, agent: LLMAgent
) -> None:
    """The call's name goes out at once, its arguments 10 s later: cut in between, the kept
    conversation has no assistant message at all (no text came, and a call is never kept)."""
    fake.set_script(
        [CallsTurn(calls=(ToolCall("add", '{"a": 1, "b": 2}'),), tokens_per_second=0.1)]
    )
    ctx = FakeContext({"messages": USER})
    task = asyncio.create_task(agent.step(ctx))
    await eventually(lambda: _started(fake))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctx.kept == {"messages": USER}
    await eventually(lambda: _closed(fake), timeout=5)


async def _started(fake: FakeLLM) -> bool:
    return bool(fake.requests) and fake.requests[-1].response_started_at is not None


async def test_stop_during_tool_calls_answers_every_call(fake: FakeLLM, agent: LLMAgent) -> None:
    fake.set_script(
        [
            CallsTurn(
                text="Working.",
                calls=(
                    ToolCall("add", '{"a": 1, "b": 2}', id="call_1"),
                    ToolCall("slow", "{}", id="call_2"),
                    ToolCall("add", '{"a": 3, "b": 4}', id="call_3"),
                ),
            )
        ]
    )
    slow_started = asyncio.Event()

    async def slow(args: dict[str, Any]) -> JSONValue:
        slow_started.set()
        await asyncio.Event().wait()
        return None

    tools = {**TOOLS, "slow": slow}
    input = {"messages": USER, "tools": ["add", "slow"]}
    first = await agent.step(FakeContext(input, None, 0, tools))
    ctx = FakeContext(input, first.state, 1, tools)
    task = asyncio.create_task(agent.step(ctx))
    await asyncio.wait_for(slow_started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(c.call_id, c.status) for c in ctx.calls] == [
        ("call_1", "finished"),
        ("call_2", "cancelled"),
    ]
    assert isinstance(ctx.kept, dict) and isinstance(first.state, dict)
    kept = ctx.kept["messages"]
    assert kept[:2] == first.state["messages"]
    assert kept[2:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sum":3}'},
        {"role": "tool", "tool_call_id": "call_2", "content": CANCELLED_BY_STOP},
        {"role": "tool", "tool_call_id": "call_3", "content": CANCELLED_BY_STOP},
    ]
    await accepted_next_turn(fake, kept)


# --- provider errors -----------------------------------------------------------------------


@pytest.mark.parametrize("configured", [True, False])
async def test_401_fails_naming_the_cause(fake: FakeLLM, configured: bool, transport: str) -> None:
    key = "sk-wrong-key-1234" if configured else None
    agent = LLMAgent(settings(fake, api_key=key, http_transport=transport))
    try:
        with pytest.raises(StepFailed) as failed:
            await agent.step(FakeContext({"messages": USER}))
    finally:
        await agent.aclose()
    message = str(failed.value)
    assert message.startswith("the model provider refused the API key (401)")
    assert "Incorrect API key provided" in message and "sk-wrong-key-1234" not in message
    assert ("STOPLINE_LLM_API_KEY" in message) is not configured
    assert "{" not in message  # the provider's words, not a repr of its body
    assert len(fake.requests) == 1  # a 401 is not retried


async def test_429_is_retried_then_succeeds(fake: FakeLLM, transport: str) -> None:
    fake.set_script([ErrorTurn(429, retry_after=0.01, times=2), TextTurn(text="finally")])
    agent = LLMAgent(settings(fake, max_retries=2, http_transport=transport))
    try:
        result = await agent.step(FakeContext({"messages": USER}))
    finally:
        await agent.aclose()
    assert result.done and result.output == "finally"
    assert [r.status for r in fake.requests] == [429, 429, 200]


@pytest.mark.parametrize(
    ("status", "words"),
    [(429, "kept rate limiting the request (429"), (503, "failed with 503")],
)
async def test_persistent_429_and_5xx_fail_naming_the_status(
    fake: FakeLLM, status: int, words: str, transport: str
) -> None:
    fake.set_script([ErrorTurn(status, retry_after=0.01, times=10)])
    agent = LLMAgent(settings(fake, max_retries=1, http_transport=transport))
    try:
        with pytest.raises(StepFailed) as failed:
            await agent.step(FakeContext({"messages": USER}))
    finally:
        await agent.aclose()
    assert words in str(failed.value) and "retried up to 1 times" in str(failed.value)
    assert [r.status for r in fake.requests] == [status, status]


async def test_5xx_then_success(fake: FakeLLM, transport: str) -> None:
    fake.set_script([ErrorTurn(500, retry_after=0.01), TextTurn(text="recovered")])
    agent = LLMAgent(settings(fake, max_retries=1, http_transport=transport))
    try:
        result = await agent.step(FakeContext({"messages": USER}))
    finally:
        await agent.aclose()
    assert result.output == "recovered"


@pytest.mark.parametrize(
    ("mode", "words"),
    [("abort", "the connection was lost"), ("error_event", "it sent an error: The stream broke")],
)
async def test_broken_stream_fails_the_step(
    fake: FakeLLM, agent: LLMAgent, mode: str, words: str
) -> None:
    fake.set_script(
        [TextTurn(text="one two three four five", break_after=3, break_mode=mode)]  # type: ignore[arg-type]
    )
    ctx = FakeContext({"messages": USER})
    with pytest.raises(StepFailed) as failed:
        await agent.step(ctx)
    message = str(failed.value)
    assert message.startswith("the model provider's stream broke after 13 characters")
    assert words in message
    assert "".join(ctx.deltas) == "one two three"


async def test_unreachable_provider_fails_naming_the_url(transport: str) -> None:
    agent = LLMAgent(
        LLMSettings(
            base_url="http://127.0.0.1:9/v1", api_key=KEY, max_retries=0, http_transport=transport
        )
    )
    try:
        with pytest.raises(StepFailed) as failed:
            await agent.step(FakeContext({"messages": USER}))
    finally:
        await agent.aclose()
    # A refused connection is a failure, not a timeout (the aiohttp transport's own mapping
    # calls it ConnectTimeout), and the message names the transport's cause.
    assert re.match(
        r"could not reach the model provider at http://127\.0\.0\.1:9/v1: the connection failed "
        r"\(retried up to 0 times; \w+: .+\)$",
        str(failed.value),
    ), str(failed.value)


# --- input ---------------------------------------------------------------------------------

_CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
_ASKS = {"role": "assistant", "content": None, "tool_calls": [_CALL]}


@pytest.mark.parametrize(
    ("input", "field", "words"),
    [
        ({}, "input.messages", "non-empty list"),
        ({"messages": []}, "input.messages", "non-empty list"),
        ({"messages": "hi"}, "input.messages", "non-empty list"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "input.messages[0].role", "one of"),
        ({"messages": [{"role": "user"}]}, "input.messages[0].content", "required"),
        ({"messages": [{"role": "user", "content": 3}]}, "input.messages[0].content", "string"),
        ({"messages": [*USER, _ASKS]}, "input.messages[1].tool_calls", "c1"),
        (
            {"messages": [*USER, _ASKS, {"role": "user", "content": "no"}]},
            "input.messages[1].tool_calls",
            "before input.messages[2]",
        ),
        (
            {"messages": [*USER, {"role": "tool", "tool_call_id": "c9", "content": "r"}]},
            "input.messages[1].tool_call_id",
            "answers no tool call",
        ),
        (
            {"messages": [*USER, {**_ASKS, "tool_calls": [{**_CALL, "function": {"name": "f"}}]}]},
            "input.messages[1].tool_calls[0].function.arguments",
            "string",
        ),
        ({"messages": USER, "model": ""}, "input.model", "model name"),
        ({"messages": USER, "max_steps": 0}, "input.max_steps", "from 1"),
        ({"messages": USER, "max_steps": 2.5}, "input.max_steps", "whole number"),
        ({"messages": USER, "temperature": 3}, "input.temperature", "0 to 2"),
        ({"messages": USER, "temperature": "hot"}, "input.temperature", "0 to 2"),
        ({"messages": USER, "tools": "add"}, "input.tools", "list of tool names"),
        ({"messages": USER, "tools": ["add", "nope"]}, "input.tools[1]", "not a registered"),
        ({"messages": USER, "api_key": "sk"}, "input.api_key", "not an input"),
    ],
)
def test_validate_input_names_the_field(input: dict[str, Any], field: str, words: str) -> None:
    agent = LLMAgent(tool_names=lambda: {"add", "shout"})
    with pytest.raises(InvalidInput) as bad:
        agent.validate_input(input)
    assert bad.value.field == field and words in bad.value.problem


def test_validate_input_accepts_a_continued_conversation() -> None:
    agent = LLMAgent(tool_names=lambda: {"add"})
    messages = [
        {"role": "system", "content": "be brief"},
        *USER,
        {**_ASKS, "content": "partial"},
        {"role": "tool", "tool_call_id": "c1", "content": CANCELLED_BY_STOP},
        {"role": "assistant", "content": "cut mid-"},
        {"role": "user", "content": [{"type": "text", "text": "go on"}]},
    ]
    agent.validate_input(
        {"messages": messages, "tools": ["add"], "model": "m", "max_steps": 5, "temperature": 0}
    )


def test_registry_builds_the_llm_agent_from_configuration() -> None:
    llm = LLMSettings(base_url="http://127.0.0.1:1/v1", model="m", max_retries=5, api_key="sk-x")
    registry = AgentRegistry.load(use_entry_points=False, llm=llm)
    agent = registry.get("llm")
    assert isinstance(agent, LLMAgent) and agent.settings == llm
    assert "sk-x" not in repr(RuntimeConfig(llm=llm))  # the key never shows in a repr
    assert isinstance(AgentRegistry.load(use_entry_points=False).get("llm"), LLMAgent)
    with_tools = AgentRegistry.load(use_entry_points=False, tool_names=lambda: {"sleep"}).get("llm")
    assert with_tools is not None
    with_tools.validate_input({"messages": USER, "tools": ["sleep"]})
    with pytest.raises(InvalidInput, match="not a registered tool"):
        with_tools.validate_input({"messages": USER, "tools": ["python"]})


def test_api_key_comes_from_the_environment() -> None:
    from runtime_service.config import llm_api_key_from

    assert llm_api_key_from({}) is None
    assert llm_api_key_from({"OPENAI_API_KEY": "sk-o"}) == "sk-o"
    both = {"OPENAI_API_KEY": "sk-o", "STOPLINE_LLM_API_KEY": "sk-s"}
    assert llm_api_key_from(both) == "sk-s"
    assert llm_api_key_from({"STOPLINE_LLM_API_KEY": "", "OPENAI_API_KEY": "sk-o"}) == "sk-o"


async def test_stopline_fake_llm_command_serves_the_agent(tmp_path: Any) -> None:
    """`stopline fake-llm` as a process: it prints the base URL to use, and the agent streams
    its scripted answer from it."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"text": "served by the command"}]))
    proc = await asyncio.create_subprocess_exec(
        *stopline_command(),
        *["fake-llm", "--port", "0", "--tokens-per-second", "0", "--script", str(script)],
        *["--api-key", KEY],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        base_url = first.strip().rsplit(" ", 1)[-1]
        assert first.startswith("fake_llm listening on http://127.0.0.1:")
        hint = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert f"--llm-base-url {base_url}" in hint
        agent = LLMAgent(LLMSettings(base_url=base_url, api_key=KEY, max_retries=0))
        ctx = FakeContext({"messages": USER})
        try:
            result = await agent.step(ctx)
        finally:
            await agent.aclose()
        assert result.output == "served by the command" and len(ctx.deltas) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
