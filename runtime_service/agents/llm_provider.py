"""The `llm` agent's model calls: one streamed Chat Completions request through the `openai` SDK.

Imported on the agent's first step, not at start-up (the SDK takes a third of a second to import).

The stream is read raw (`with_streaming_response`, SSE `data:` lines parsed with `orjson`),
not as the SDK's typed chunks, which cost most of the runtime's CPU under load (BENCHMARKS.md,
issue 13); the SDK still builds the request, authenticates, retries and maps HTTP errors.

Cancellation: the stream is read inside `async with` blocks that close the HTTP response, so a
stop that cancels the step closes it wherever the task is waiting: inside the read (httpcore
closes the unfinished exchange's connection instead of pooling it) or in the agent's own
`ctx.delta` await (the `async with` exit closes it). The provider sees the connection close at
once; see fake_llm/server.py's docstring for how the HTTP client behaves underneath.

Provider errors become `ProviderError` with a message in the operator's terms (the provider's
own message, never a Python repr or traceback); the agent turns it into StepFailed. 429, 5xx and
failed connections are retried by the SDK first (`LLMSettings.max_retries`, with its backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httpx2
import openai
import orjson
from openai import AsyncOpenAI, omit
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from opentelemetry import trace

from runtime_service.config import LLM_API_KEY_ENV, LLMSettings
from stopline import tracing
from stopline.json_values import shown

# Sent when no key is configured: the SDK insists on one, local servers ignore it, and a real
# provider answers 401, which the step reports together with how to configure a key.
NO_KEY = "no-api-key-configured"


class ProviderError(Exception):
    """A model call that failed for good; the message says why, in the operator's terms."""


@dataclass
class ModelAnswer:
    """A complete streamed answer: its text and the tool calls it asked for (API form)."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


class _CallAssembler:
    """Tool calls arrive as deltas keyed by index: the first carries id and name, the rest
    append pieces of the arguments' JSON text."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if call_id:
            call["id"] = call_id
        if name:
            call["name"] += name
        if arguments:
            call["arguments"] += arguments

    def complete(self, step: int) -> list[dict[str, Any]]:
        return [
            {
                # A few OpenAI-compatible servers send no id; the conversation needs one.
                "id": call["id"] or f"call_{step}_{index}",
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for index, call in sorted(self._calls.items())
        ]


def _host(base_url: str) -> str:
    """The provider's host, for the span (never the path, which may hold a deployment key)."""
    return urllib.parse.urlsplit(base_url).hostname or ""


def _provider_message(exc: openai.APIError) -> str:
    """The provider's own words: the error body's message, not the SDK's repr of the body."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    if isinstance(exc, openai.APIStatusError):
        return exc.response.reason_phrase or "no message"
    return exc.message


class Provider:
    """One SDK client per event loop (its connection pool belongs to the loop), made on first
    use: constructing the agent costs nothing and touches no network."""

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self._client: AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            http_client = (
                openai.DefaultAioHttpClient() if self.settings.http_transport == "aiohttp" else None
            )
            self._client = AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key or NO_KEY,
                max_retries=self.settings.max_retries,
                http_client=http_client,
            )
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def stream_answer(
        self,
        *,
        step: int,
        model: str,
        messages: list[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
        temperature: float | None,
        on_text: Callable[[str], Awaitable[None]],
    ) -> ModelAnswer:
        """Stream one answer, passing each piece of text to `on_text` as it arrives.

        One CLIENT span per call (OpenTelemetry's GenAI conventions: `chat <model>`), a child of
        the step's span; the request carries its trace context to a provider that reads it.
        Model and finish reason only: no message, no key."""
        with tracing.tracer().start_as_current_span(
            f"chat {model}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "openai",
                "gen_ai.request.model": model,
                "server.address": _host(self.settings.base_url),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                answer = await self._stream_answer(
                    step, model, messages, tools, temperature, on_text
                )
            except ProviderError:
                span.set_status(trace.StatusCode.ERROR, "provider error")
                span.set_attribute("error.type", "provider_error")
                raise
            except asyncio.CancelledError:
                span.set_attribute("stopline.cancelled", True)
                raise
            if answer.finish_reason is not None:
                span.set_attribute("gen_ai.response.finish_reasons", [answer.finish_reason])
            return answer

    async def _stream_answer(
        self,
        step: int,
        model: str,
        messages: list[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
        temperature: float | None,
        on_text: Callable[[str], Awaitable[None]],
    ) -> ModelAnswer:
        answer = ModelAnswer()
        calls = _CallAssembler()
        texts: list[str] = []
        started = False
        try:
            request = self.client().chat.completions.with_streaming_response.create(
                model=model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                tools=cast(list[ChatCompletionToolParam], list(tools)) if tools else omit,
                temperature=omit if temperature is None else temperature,
                stream=True,
                extra_headers=dict(tracing.outgoing_metadata(()) or ()) or None,
            )
            async with (
                request as response,
                contextlib.aclosing(_chunks(response.http_response)) as stream,
            ):
                started = True
                async for chunk in stream:
                    content, finish_reason = _read_chunk(chunk, calls)
                    if content:
                        texts.append(content)
                        await on_text(content)
                    if finish_reason:
                        answer.finish_reason = finish_reason
        except openai.APIStatusError as exc:
            raise ProviderError(self._status_failure(exc)) from None
        except openai.APIConnectionError as exc:
            raise ProviderError(self._connection_failure(exc, started, texts)) from None
        except _StreamBroken as exc:
            raise ProviderError(
                f"the model provider's stream broke after {_received(texts)}: {exc}"
            ) from None
        except openai.OpenAIError as exc:
            raise ProviderError(f"the model provider call failed: {exc}") from None
        answer.text = "".join(texts)
        answer.tool_calls = calls.complete(step)
        if answer.finish_reason is None:
            raise ProviderError(
                f"the model provider's stream ended after {_received(texts)} without finishing "
                "the answer"
            )
        return answer

    def _status_failure(self, exc: openai.APIStatusError) -> str:
        status, message = exc.status_code, _provider_message(exc)
        retries = self.settings.max_retries
        if status in (401, 403):
            hint = (
                ""
                if self.settings.api_key
                else f" (no API key is configured: set {' or '.join(LLM_API_KEY_ENV)})"
            )
            return f"the model provider refused the API key ({status}){hint}: {message}"
        if status == 429:
            return (
                f"the model provider kept rate limiting the request (429; retried up to "
                f"{retries} times): {message}"
            )
        if status >= 500:
            return (
                f"the model provider failed with {status} (retried up to {retries} times): "
                f"{message}"
            )
        return f"the model provider rejected the request ({status}): {message}"

    def _connection_failure(
        self, exc: openai.APIConnectionError, started: bool, texts: list[str]
    ) -> str:
        cause = _named_cause(exc)
        why = f"{type(cause).__name__}: {cause}" if cause is not exc else exc.message
        if started:
            return (
                f"the model provider's stream broke after {_received(texts)}: the connection "
                f"was lost ({why})"
            )
        timed_out = "timed out" if _timed_out(exc) else "failed"
        return (
            f"could not reach the model provider at {self.settings.base_url}: the connection "
            f"{timed_out} (retried up to {self.settings.max_retries} times; {why})"
        )


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a `raise ... from` chain: the transport's own error.

    The SDK wraps the HTTP client's error (APIConnectionError from httpx2's), and the aiohttp
    transport wraps aiohttp's in an httpx2 one chosen by a coarse table (a refused connection
    becomes `ConnectTimeout`), so the innermost one is what names the cause."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _named_cause(exc: BaseException) -> BaseException:
    """The innermost exception of the chain that has a message (inner ones may have none)."""
    named = exc
    while exc.__cause__ is not None:
        exc = exc.__cause__
        if str(exc):
            named = exc
    return named


def _timed_out(exc: BaseException) -> bool:
    """Whether a transport failure was a timeout, judged by its root cause (see above)."""
    cause = _root_cause(exc)
    if cause is exc:
        return isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException)
    return isinstance(cause, TimeoutError | httpx2.TimeoutException)


class _StreamBroken(Exception):
    """The answer's stream failed after it began; the message says how, after "broke after N
    characters of the answer: "."""


# After `data: [DONE]` the rest of the body (normally just its end) is read for at most this
# long, so the connection goes back to the pool (as the SDK's own stream does).
_DRAIN_SECONDS = 0.1


async def _chunks(response: httpx2.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The stream's chunks as plain JSON objects, read from the raw server-sent events.

    Why not the SDK's typed stream: it builds a pydantic `ChatCompletionChunk` for every token,
    which cost most of the runtime's CPU under load (BENCHMARKS.md, issue 13); the request, its
    retries and the HTTP status errors still go through the SDK. What the SDK's stream also did
    is done here: events end at a blank line (CR, LF or CRLF, split anywhere across reads),
    `data: [DONE]` ends the stream, and an event whose JSON holds `error` is the provider's
    error in the stream. Transport failures while reading become `_StreamBroken`.
    """
    body = response.aiter_bytes()
    pending = b""  # the last line's start, until its end arrives
    skip_lf = False  # the last read ended with CR: a LF first in the next one ends no line
    data: list[bytes] = []
    try:
        async for received in body:
            if skip_lf:
                skip_lf = False
                if received.startswith(b"\n"):
                    received = received[1:]
            pending += received
            if not pending:
                continue
            lines = pending.splitlines()
            last = pending[-1]
            skip_lf = last == 13
            pending = b"" if last == 10 or skip_lf else lines.pop()
            for line in lines:
                if line:
                    if line.startswith(b"data:"):
                        value = line[5:]
                        data.append(value[1:] if value.startswith(b" ") else value)
                    continue  # comments, `event:`, `id:`, `retry:`: nothing the answer needs
                if not data:
                    continue
                event = b"\n".join(data)
                data = []
                if event.startswith(b"[DONE]"):
                    await _drain(body)
                    return
                yield _event_json(event)
    except httpx2.RequestError as exc:
        if _timed_out(exc):
            raise _StreamBroken(_lost(exc, "timed out")) from None
        raise _StreamBroken(_lost(exc)) from None
    finally:
        await body.aclose()
    # The body ended: an event not closed by a blank line still counts (as in the SDK).
    for line in pending.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    if data and not data[0].startswith(b"[DONE]"):
        yield _event_json(b"\n".join(data))


async def _drain(body: AsyncIterator[bytes]) -> None:
    with contextlib.suppress(TimeoutError, httpx2.RequestError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in body:
                pass


def _lost(exc: Exception, how: str = "was lost") -> str:
    cause = _named_cause(exc)
    why = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return f"the connection {how} ({why})"


def _event_json(event: bytes) -> dict[str, Any]:
    try:
        # orjson: a tenth of json.loads' CPU per chunk, which was a tenth of the runtime's
        # CPU under load once the HTTP client was cheaper (BENCHMARKS.md, issue 13).
        chunk = orjson.loads(event)
    except orjson.JSONDecodeError:
        text = event.decode(errors="replace")
        raise _StreamBroken(f"it sent an event that is not JSON: {shown(text, 200)}") from None
    if not isinstance(chunk, dict):
        raise _StreamBroken(f"it sent an event that is not a JSON object: {shown(chunk)}")
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = shown(error) if not isinstance(error, dict) else "no message"
        raise _StreamBroken(f"it sent an error: {message}")
    return chunk


def _read_chunk(chunk: dict[str, Any], calls: _CallAssembler) -> tuple[str | None, str | None]:
    """A chunk's text and finish reason; its tool-call pieces go to `calls`."""
    choices = chunk.get("choices")
    if not choices:
        return None, None  # e.g. the usage chunk
    try:
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        for tc in delta.get("tool_calls") or ():
            fn = tc.get("function") or {}
            calls.add(tc["index"], tc.get("id"), fn.get("name"), fn.get("arguments"))
        finish_reason = choice.get("finish_reason")
    except (AttributeError, KeyError, TypeError, IndexError):
        raise _StreamBroken(f"it sent a malformed chunk: {shown(chunk)}") from None
    if content is not None and not isinstance(content, str):
        raise _StreamBroken(f"it sent a malformed chunk: {shown(chunk)}")
    return content, finish_reason if isinstance(finish_reason, str) else None


def _received(texts: list[str]) -> str:
    size = sum(map(len, texts))
    return f"{size} character{'' if size == 1 else 's'} of the answer"
