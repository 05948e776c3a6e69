"""The `llm` agent's model calls: one streamed Chat Completions request through the `openai` SDK.

Imported on the agent's first step, not at start-up (the SDK takes a third of a second to import).

Cancellation: the stream is iterated inside `async with stream:`, so a stop that cancels the step
closes the HTTP response wherever the task is waiting: inside the SDK's read (httpcore closes the
unfinished exchange's connection instead of pooling it) or in the agent's own `ctx.delta` await
(the `async with` exit closes it). The provider sees the connection close at once; see
fake_llm/server.py's docstring for how the SDK behaves underneath.

Provider errors become `ProviderError` with a message in the operator's terms (the provider's
own message, never a Python repr or traceback); the agent turns it into StepFailed. 429, 5xx and
failed connections are retried by the SDK first (`LLMSettings.max_retries`, with its backoff).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import openai
from openai import AsyncOpenAI, omit
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from runtime_service.config import LLM_API_KEY_ENV, LLMSettings

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
            self._client = AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key or NO_KEY,
                max_retries=self.settings.max_retries,
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
        """Stream one answer, passing each piece of text to `on_text` as it arrives."""
        answer = ModelAnswer()
        calls = _CallAssembler()
        texts: list[str] = []
        started = False
        try:
            stream = await self.client().chat.completions.create(
                model=model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                tools=cast(list[ChatCompletionToolParam], list(tools)) if tools else omit,
                temperature=omit if temperature is None else temperature,
                stream=True,
            )
            started = True
            async with stream:
                async for chunk in stream:
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    delta = choice.delta
                    if delta.content:
                        texts.append(delta.content)
                        await on_text(delta.content)
                    for tc in delta.tool_calls or ():
                        fn = tc.function
                        calls.add(
                            tc.index, tc.id, fn.name if fn else None, fn.arguments if fn else None
                        )
                    if choice.finish_reason:
                        answer.finish_reason = choice.finish_reason
        except openai.APIStatusError as exc:
            raise ProviderError(self._status_failure(exc)) from None
        except openai.APIConnectionError as exc:
            raise ProviderError(self._connection_failure(exc, started, texts)) from None
        except openai.APIError as exc:  # an error event in the stream
            raise ProviderError(
                f"the model provider's stream broke after {_received(texts)}: it sent an error: "
                f"{_provider_message(exc)}"
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
        cause = exc.__cause__
        why = f"{type(cause).__name__}: {cause}" if cause and str(cause) else exc.message
        if started:
            return (
                f"the model provider's stream broke after {_received(texts)}: the connection "
                f"was lost ({why})"
            )
        timed_out = "timed out" if isinstance(exc, openai.APITimeoutError) else "failed"
        return (
            f"could not reach the model provider at {self.settings.base_url}: the connection "
            f"{timed_out} (retried up to {self.settings.max_retries} times; {why})"
        )


def _received(texts: list[str]) -> str:
    size = sum(map(len, texts))
    return f"{size} character{'' if size == 1 else 's'} of the answer"
