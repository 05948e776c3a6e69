"""The local OpenAI-compatible server, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import nullcontext
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from fake_llm import (
    ErrorTurn,
    FakeLLM,
    RequestRecord,
    ServerConfig,
    TextTurn,
    ToolCall,
    ToolCallsTurn,
    script_from_json,
    turn_to_json,
)
from fake_llm.server import tokenize
from tests.conftest import eventually

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM(ServerConfig(tokens_per_second=0, api_key="sk-test-key"))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(fake: FakeLLM) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=fake.base_url, api_key="sk-test-key", max_retries=0) as c:
        yield c


def test_tokens_join_back_exactly() -> None:
    for text in ["Hello, world!", "  lead and trail  ", "one", "", "a\nb  c\t"]:
        assert "".join(tokenize(text)) == text


async def test_sdk_streams_scripted_text(fake: FakeLLM, client: AsyncOpenAI) -> None:
    fake.set_script([TextTurn(text="The quick brown fox jumps.")])
    stream = await client.chat.completions.create(model="m1", messages=USER, stream=True)
    pieces, finish = [], None
    async with stream:
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == "The quick brown fox jumps."
    assert finish == "stop"
    (rec,) = fake.requests
    assert rec.outcome == "completed" and rec.tokens_sent == 5 and rec.client_closed_at is None
    assert rec.model == "m1" and rec.message_count == 1 and rec.stream
    assert stream.response.headers["x-request-id"] == rec.request_id


async def test_generated_answer_with_usage_and_non_streamed(
    fake: FakeLLM, client: AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    usage = None
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert len(tokenize(text)) == fake.config.default_tokens
    assert usage is not None and usage.completion_tokens == fake.config.default_tokens

    fake.set_script([TextTurn(text="plain answer")])
    done = await client.chat.completions.create(model="m", messages=USER)
    assert done.choices[0].message.content == "plain answer"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 2


async def test_tool_call_deltas_assemble(fake: FakeLLM, client: AsyncOpenAI) -> None:
    args_a = json.dumps({"city": "Paris", "units": "metric"})
    fake.set_script(
        [
            ToolCallsTurn(
                text="Let me check.",
                calls=(ToolCall("weather", args_a, id="call_a"), ToolCall("clock", "{}")),
                argument_chunk=5,
            )
        ]
    )
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    calls: dict[int, dict[str, str]] = {}
    text, finish, argument_deltas = "", None, 0
    async for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            if tc.function is not None:
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
                argument_deltas += 1 if tc.function.arguments else 0
    assert text == "Let me check." and finish == "tool_calls"
    assert calls[0] == {"id": "call_a", "name": "weather", "arguments": args_a}
    assert calls[1]["name"] == "clock" and calls[1]["arguments"] == "{}"
    assert calls[1]["id"].startswith("call_")
    assert argument_deltas >= len(args_a) // 5  # streamed in pieces, not in one go

    # The conversation with every call answered is accepted; the same without one answer is not.
    assistant: ChatCompletionMessageParam = {
        "role": "assistant",
        "content": text,
        "tool_calls": [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls.values()
        ],
    }
    answers: list[ChatCompletionMessageParam] = [
        {"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls.values()
    ]
    fake.set_script([TextTurn(text="done")])
    ok = await client.chat.completions.create(model="m", messages=[*USER, assistant, *answers])
    assert ok.choices[0].message.content == "done"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=[*USER, assistant, answers[0]])
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert calls[1]["id"] in body["message"] and body["param"] == "messages.[1].role"
    assert caught.value.type == "invalid_request_error"
    assert fake.requests[-1].outcome == "rejected" and fake.requests[-1].status == 400


async def test_malformed_tool_arguments_are_sent_as_written(
    fake: FakeLLM, client: AsyncOpenAI
) -> None:
    fake.set_script([ToolCallsTurn(calls=(ToolCall("run", '{"code": "print(1)"'),))])
    done = await client.chat.completions.create(model="m", messages=USER)
    calls = done.choices[0].message.tool_calls
    assert calls is not None and done.choices[0].finish_reason == "tool_calls"
    call = calls[0]
    assert call.type == "function" and call.function.arguments == '{"code": "print(1)"'
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([], "messages"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c", "content": "r"},
            ],
            "messages.[1].role",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "user", "content": "never mind"},
            ],
            "messages.[1].role",
        ),
    ],
)
async def test_validation_rejects_like_the_real_api(
    client: AsyncOpenAI, messages: list[Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=messages)
    assert caught.value.param == param


async def test_api_key_is_checked(fake: FakeLLM) -> None:
    async with AsyncOpenAI(base_url=fake.base_url, api_key="sk-wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="m", messages=USER)
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        assert "sk-wrong-key" not in caught.value.message  # the key is masked
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    assert fake.requests[-1].outcome == "rejected" and fake.requests[-1].status == 401


async def test_rate_limit_is_retried_by_the_sdk(fake: FakeLLM) -> None:
    fake.set_script([ErrorTurn(429, retry_after=0.01, times=2), TextTurn(text="finally")])
    async with AsyncOpenAI(base_url=fake.base_url, api_key="sk-test-key", max_retries=3) as c:
        done = await c.chat.completions.create(model="m", messages=USER)
    assert done.choices[0].message.content == "finally"
    assert [r.status for r in fake.requests] == [429, 429, 200]


async def test_rate_limit_and_server_errors_without_retries(
    fake: FakeLLM, client: AsyncOpenAI
) -> None:
    fake.set_script([ErrorTurn(429, retry_after=1.5), ErrorTurn(503)])
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=USER, stream=True)
    assert limited.value.response.headers["retry-after-ms"] == "1500"
    assert limited.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="m", messages=USER, stream=True)
    assert failed.value.status_code == 503


async def _closed(fake: FakeLLM) -> RequestRecord | None:
    rec = fake.requests[-1]
    return rec if rec.client_closed_at is not None else None


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_client_closing_mid_stream_is_recorded(
    fake: FakeLLM, client: AsyncOpenAI, how: str
) -> None:
    """Closing the SDK stream, or cancelling the task that iterates it, closes the connection;
    the server records it while it waits for the next token's slot (10 s away)."""
    fake.set_script([TextTurn(tokens=1000, tokens_per_second=0.1)])
    got_token = asyncio.Event()

    async def consume() -> None:
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        async for chunk in stream:
            if chunk.choices[0].delta.content:
                got_token.set()
                if how == "close":
                    await stream.close()
                    return

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_token.wait(), 10)
    if how == "cancel":
        task.cancel()
    with pytest.raises(asyncio.CancelledError) if how == "cancel" else nullcontext():
        await task
    rec = await eventually(lambda: _closed(fake), timeout=5)
    assert rec.outcome == "client_closed" and rec.tokens_sent == 1
    assert rec.response_started_at is not None and rec.client_closed_at is not None
    # Noticed while waiting for token 2 (due 10 s after the first): well before it was sent.
    assert rec.client_closed_at - rec.response_started_at < 9


@pytest.mark.parametrize(
    ("mode", "error"), [("abort", openai.APIConnectionError), ("error_event", openai.APIError)]
)
async def test_scripted_broken_stream(
    fake: FakeLLM, client: AsyncOpenAI, mode: str, error: type[Exception]
) -> None:
    fake.set_script(
        [script_from_json([{"text": "a b c d e f", "break_after": 3, "break_mode": mode}])[0]]
    )
    received: list[str] = []

    async def consume() -> None:
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(error):
        await consume()
    assert "".join(received) == "a b c"
    assert fake.requests[-1].outcome == "broken"


async def test_control_over_http(fake: FakeLLM, client: AsyncOpenAI) -> None:
    root = fake.base_url.removesuffix("/v1")
    script = [
        turn_to_json(ToolCallsTurn(calls=(ToolCall("f", "{}", id="call_x"),))),
        {"kind": "text", "text": "hi"},
    ]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{root}/_fake/script", json={"script": script}) as resp:
            assert resp.status == 200
        async with http.post(f"{root}/_fake/script", json=[{"kind": "poem"}]) as resp:
            assert resp.status == 400
            assert "script[0].kind" in (await resp.json())["error"]["message"]
        first = await client.chat.completions.create(model="m", messages=USER)
        assert first.choices[0].finish_reason == "tool_calls"
        async with http.get(f"{root}/_fake/script") as resp:
            assert (await resp.json())["script"] == [turn_to_json(TextTurn(text="hi"))]
        async with http.get(f"{root}/_fake/requests") as resp:
            (listed,) = (await resp.json())["requests"]
        assert listed["request_id"] == fake.requests[0].request_id
        assert listed["outcome"] == "completed" and listed["turn"] == "tool_calls"
        async with http.delete(f"{root}/_fake/requests") as resp:
            assert resp.status == 200
    assert fake.requests == []
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_runs_as_a_process(tmp_path: Any) -> None:
    """Scripted from a file, and a disconnect read by another process over HTTP."""
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps([{"text": "from a file"}, {"tokens": 100, "tokens_per_second": 1}])
    )
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "fake_llm", "--port", "0", "--script", str(script)],
        *["--tokens-per-second", "0"],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        base_url = line.strip().rsplit(" ", 1)[-1]
        assert base_url.startswith("http://127.0.0.1:")
        async with AsyncOpenAI(base_url=base_url, api_key="any", max_retries=0) as c:
            done = await c.chat.completions.create(model="m", messages=USER)
            assert done.choices[0].message.content == "from a file"
            stream = await c.chat.completions.create(model="m", messages=USER, stream=True)
            async with stream:
                async for chunk in stream:
                    if chunk.choices[0].delta.content:
                        break  # leaving `async with` closes the stream

        async def closed() -> dict[str, Any] | None:
            root = base_url.removesuffix("/v1")
            async with aiohttp.ClientSession() as http, http.get(f"{root}/_fake/requests") as r:
                last: dict[str, Any] = (await r.json())["requests"][-1]
            return last if last["client_closed_at"] is not None else None

        record = await eventually(closed, timeout=10)
        assert record["outcome"] == "client_closed" and record["tokens_sent"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
