"""The built-in `llm` agent: a chat model with tools, over any OpenAI-compatible Chat Completions
server (OpenAI itself, vLLM, Ollama, LiteLLM, `stopline fake-llm`...).

Input: {"messages": [OpenAI chat messages], "model"?: str, "tools"?: [registered tool names],
"max_steps"?: int, "temperature"?: number}. State (checkpointed after every step):
{"messages": [...]}, the conversation so far. One step is either one streamed model call (its
text goes out as token deltas; the answer is appended to the conversation) or the tool calls that
answer asked for (each through the runtime, so every call is settled; each result, or its error,
becomes a tool message the model reads next). The operation is done when the model answers
without tool calls; its result is that answer's text.

A stop cuts the step in flight. What the agent keeps for it (`ctx.keep_on_stop`) is always a
conversation the API accepts for the next turn: the messages so far plus the partial answer's
text (never a half-streamed tool call), or, during tool calls, the assistant's tool calls with a
tool message for every call id (a cut or unstarted one says "cancelled by a stop"). A client
continues by starting a new operation with those messages and its next user message.

Approvals: before a tool step runs any call, every call to a tool marked `needs_approval` must
have a person's decision. The step asks for the first one missing (StepResult.ask: the operation
WAITS, holding nothing) and the decisions collected so far ride in the state
(`{"messages": ..., "approvals": {call_id: answer}}`), so the next step picks them up. Once all
are in, the calls run: an approved one with the arguments the person gave (edited, or as asked),
a rejected one not at all (its tool message tells the model it was rejected and why, and the
model goes on). A call thus runs at most once however many answers race: only the first wins.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from runtime_service.agents.base import (
    Answered,
    InputRequest,
    InvalidInput,
    StepFailed,
    StepResult,
)
from runtime_service.agents.llm_messages import (
    CANCELLED_BY_STOP,
    tool_message,
    unanswered_tool_calls,
    validate_messages,
)
from runtime_service.config import LLMSettings
from runtime_service.domain import JSONValue
from stopline.json_values import dump_json, shown

if TYPE_CHECKING:
    from runtime_service.agents.llm_provider import Provider

DEFAULT_MAX_STEPS = 20
# The answer a call gets when the process running it died mid-call (see _tool_step).
OUTCOME_UNKNOWN = (
    "the outcome of this tool call is unknown: the process running it stopped mid-call, so it "
    "may or may not have taken effect; it was not run again"
)
MAX_STEPS_LIMIT = 1000


# --- what the agent uses of the runtime (a subset of agents/base.py's StepContext) ----------


class ToolOutcomeLike(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def result(self) -> JSONValue: ...
    @property
    def error(self) -> str | None: ...
    @property
    def cancelled(self) -> bool: ...


class ToolSpecLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def parameters(self) -> dict[str, Any]: ...
    @property
    def needs_approval(self) -> bool: ...


class ToolCallLike(Protocol):
    def fail(self, error: str) -> None: ...


class LLMStepContext(Protocol):
    """Exactly what the agent needs of StepContext."""

    @property
    def step(self) -> int: ...
    @property
    def input(self) -> dict[str, Any]: ...
    @property
    def state(self) -> JSONValue: ...
    @property
    def unknown_calls(self) -> frozenset[str]: ...
    @property
    def answer(self) -> Answered | None: ...

    async def delta(self, text: str) -> None: ...

    def tool_call(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> AbstractAsyncContextManager[ToolCallLike]: ...

    async def call_tool(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> ToolOutcomeLike: ...

    def tool_specs(self, names: Sequence[str] | None = None) -> Sequence[ToolSpecLike]: ...

    def keep_on_stop(self, state: JSONValue) -> None: ...


# --- input ---------------------------------------------------------------------------------


def _max_steps(input: dict[str, Any]) -> int:
    value = input.get("max_steps", DEFAULT_MAX_STEPS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS_LIMIT:
        raise InvalidInput(
            "input.max_steps",
            f"must be a whole number from 1 to {MAX_STEPS_LIMIT}, got {shown(value)}",
        )
    return value


def _tool_names(input: dict[str, Any]) -> list[str]:
    value = input.get("tools", [])
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise InvalidInput("input.tools", f"must be a list of tool names, got {shown(value)}")
    return list(value)


class LLMAgent:
    """The agent. `tool_names` says which tools the runtime has registered (None: not known
    here, so names are checked when a step asks the runtime for their specs)."""

    def __init__(
        self,
        settings: LLMSettings | None = None,
        tool_names: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.settings = settings or LLMSettings()
        self._tool_names = tool_names
        self._provider: Provider | None = None
        self._making: asyncio.Future[Provider] | None = None

    # --- validation ----------------------------------------------------------------------

    def validate_input(self, input: dict[str, Any]) -> None:
        unknown_keys = sorted(
            set(input) - {"messages", "model", "tools", "max_steps", "temperature"}
        )
        if unknown_keys:
            raise InvalidInput(f"input.{unknown_keys[0]}", "is not an input of the llm agent")
        validate_messages(input.get("messages"))
        model = input.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise InvalidInput("input.model", f"must be a model name, got {shown(model)}")
        _max_steps(input)
        temperature = input.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not math.isfinite(temperature)
            or not 0 <= temperature <= 2
        ):
            raise InvalidInput(
                "input.temperature", f"must be a number from 0 to 2, got {shown(temperature)}"
            )
        names = _tool_names(input)
        if self._tool_names is not None:
            known = self._tool_names()
            for i, name in enumerate(names):
                if name not in known:
                    raise InvalidInput(
                        f"input.tools[{i}]",
                        f"{shown(name)} is not a registered tool (known: "
                        f"{', '.join(sorted(known)) or 'none'})",
                    )

    # --- steps ---------------------------------------------------------------------------

    async def step(self, ctx: LLMStepContext) -> StepResult:
        state = ctx.state
        if isinstance(state, dict) and isinstance(state.get("messages"), list):
            messages: list[dict[str, Any]] = list(state["messages"])
        else:
            messages = list(ctx.input["messages"])
        pending = unanswered_tool_calls(messages)
        if pending:
            approvals = _approvals(state, ctx.answer)
            asking = self._approval_needed(ctx, pending, approvals)
            if asking is not None:
                # Nothing runs until every call needing approval has its decision.
                return StepResult(
                    state={"messages": messages, "approvals": approvals},
                    output={"awaiting_approval": asking.call_id},
                    ask=asking,
                )
            # Run even past max_steps: answered calls leave the checkpointed conversation valid
            # for a next turn when the bound then fails the operation.
            return await self._tool_step(ctx, messages, pending, approvals)
        max_steps = _max_steps(ctx.input)
        if ctx.step >= max_steps:
            raise StepFailed(
                f"the llm agent reached max_steps ({max_steps}) without a final answer; "
                "start a new operation with the conversation (Operation.state) to go on"
            )
        return await self._model_step(ctx, messages)

    async def provider(self) -> Provider:
        """The SDK client, made on first use in a worker thread: importing `openai` takes a
        second or more, and done on the event loop it stalled every other operation's stops
        and lease renewals (a healthy operation was seen as abandoned and taken over)."""
        if self._provider is None:
            if self._making is None:
                self._making = asyncio.ensure_future(
                    asyncio.to_thread(_make_provider, self.settings)
                )
            # Shielded: a stop of the step that asked first must not cancel the making.
            provider = await asyncio.shield(self._making)
            self._provider = self._provider or provider
        return self._provider

    async def aclose(self) -> None:
        """Close the SDK's connection pool (tests; the runtime's process exit does it too)."""
        if self._provider is not None:
            await self._provider.aclose()

    async def _model_step(self, ctx: LLMStepContext, messages: list[dict[str, Any]]) -> StepResult:
        provider = await self.provider()  # first: it imports llm_provider off the event loop
        from runtime_service.agents.llm_provider import ProviderError

        names = _tool_names(ctx.input)
        try:
            specs = ctx.tool_specs(names) if names else []
        except (InvalidInput, KeyError, ValueError) as exc:
            raise StepFailed(f"input.tools: {exc}") from None
        tools = [
            {
                "type": "function",
                "function": {
                    "name": spec.name,
                    "description": spec.description,
                    "parameters": spec.parameters,
                },
            }
            for spec in specs
        ]
        # Until text arrives a stop keeps the conversation as it was; then the partial answer,
        # updated with every delta (a string of text only: no tool call is half kept).
        ctx.keep_on_stop({"messages": messages})
        partial = {"role": "assistant", "content": ""}
        kept = {"messages": [*messages, partial]}

        async def on_text(text: str) -> None:
            partial["content"] += text
            ctx.keep_on_stop(kept)
            await ctx.delta(text)

        temperature = ctx.input.get("temperature")
        try:
            answer = await provider.stream_answer(
                step=ctx.step,
                model=ctx.input.get("model") or self.settings.model,
                messages=messages,
                tools=tools,
                temperature=None if temperature is None else float(temperature),
                on_text=on_text,
            )
        except ProviderError as exc:
            raise StepFailed(str(exc)) from None
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        messages.append(message)
        if answer.tool_calls:
            asked = [{"id": c["id"], "name": c["function"]["name"]} for c in answer.tool_calls]
            return StepResult(state={"messages": messages}, output={"tool_calls": asked})
        return StepResult(state={"messages": messages}, output=answer.text, done=True)

    def _approval_needed(
        self,
        ctx: LLMStepContext,
        calls: list[dict[str, Any]],
        approvals: dict[str, Any],
    ) -> InputRequest | None:
        """The approval to ask for next: the first call to a tool that needs one and has no
        decision yet (calls settled outcome unknown are never run again, so need none)."""
        allowed = set(_tool_names(ctx.input))
        for call in calls:
            call_id, name = str(call["id"]), str(call["function"]["name"])
            if call_id in approvals or call_id in ctx.unknown_calls or name not in allowed:
                continue
            try:
                (spec,) = ctx.tool_specs([name])
            except (KeyError, ValueError):
                continue  # unknown: the tool step fails the call, naming why
            if not spec.needs_approval:
                continue
            raw = call["function"]["arguments"]
            try:
                arguments: JSONValue = json.loads(raw) if raw.strip() else {}
            except ValueError:
                arguments = raw
            return InputRequest.approval(
                call_id,
                name,
                arguments,
                prompt=f"The model asks to run {name} with {dump_json(arguments)}",
                schema=spec.parameters,
            )
        return None

    async def _tool_step(
        self,
        ctx: LLMStepContext,
        messages: list[dict[str, Any]],
        calls: list[dict[str, Any]],
        approvals: dict[str, Any] | None = None,
    ) -> StepResult:
        allowed = set(_tool_names(ctx.input))
        answers: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            # If a stop cuts this call, it and the ones after it are answered "cancelled".
            ctx.keep_on_stop(
                {
                    "messages": messages
                    + answers
                    + [tool_message(c["id"], CANCELLED_BY_STOP) for c in calls[i:]]
                }
            )
            call_id, name = str(call["id"]), str(call["function"]["name"])
            raw = call["function"]["arguments"]
            decision = (approvals or {}).get(call_id)
            if call_id in ctx.unknown_calls:
                # Started by an attempt whose process died, and settled outcome unknown: not run
                # again (its effect may have happened), the model is told and decides.
                content, ok = f"error: {OUTCOME_UNKNOWN}", False
            elif isinstance(decision, dict) and not decision.get("approved"):
                content, ok = await self._rejected(ctx, name, raw, call_id, decision), False
            else:
                if isinstance(decision, dict) and "arguments" in decision:
                    raw = dump_json(decision["arguments"])  # the person's edit
                content, ok = await self._run_tool(ctx, name, raw, call_id, allowed)
            answers.append(tool_message(call_id, content))
            results.append({"id": call_id, "name": name, "ok": ok})
        messages.extend(answers)
        return StepResult(state={"messages": messages}, output={"tool_results": results})

    @staticmethod
    async def _rejected(
        ctx: LLMStepContext, name: str, raw: str, call_id: str, decision: dict[str, Any]
    ) -> str:
        """A call a person rejected: recorded failed without running, the model told why."""
        reason = str(decision.get("reason") or "no reason given")
        error = f"a person rejected this tool call: {reason}"
        try:
            arguments: JSONValue = json.loads(raw) if raw.strip() else {}
        except ValueError:
            arguments = raw
        async with ctx.tool_call(name, arguments, call_id) as record:
            record.fail(error)
        return f"error: {error}"

    async def _run_tool(
        self,
        ctx: LLMStepContext,
        name: str,
        raw_arguments: str,
        call_id: str,
        allowed: set[str],
    ) -> tuple[str, bool]:
        """Run one call; its answer for the model (result or error text) and whether it worked."""
        try:
            arguments: JSONValue = json.loads(raw_arguments) if raw_arguments.strip() else {}
        except ValueError:
            arguments = raw_arguments  # the runtime fails it as malformed JSON, naming why
        if name not in allowed:
            available = ", ".join(sorted(allowed)) or "none"
            error = f"there is no tool named {shown(name)} (available: {available})"
            async with ctx.tool_call(name, arguments, call_id) as record:
                record.fail(error)
            return f"error: {error}", False
        outcome = await ctx.call_tool(name, arguments, call_id=call_id)
        if outcome.ok:
            result = outcome.result
            return (result if isinstance(result, str) else dump_json(result)), True
        if outcome.cancelled:
            return f"error: {outcome.error or CANCELLED_BY_STOP}", False
        return f"error: {outcome.error or 'the tool call failed'}", False


def _make_provider(settings: LLMSettings) -> Provider:
    from runtime_service.agents.llm_provider import Provider

    return Provider(settings)


def _approvals(state: JSONValue, answer: Answered | None) -> dict[str, Any]:
    """The decisions collected so far (in the state), with the one the previous step's question
    just got."""
    approvals: dict[str, Any] = {}
    if isinstance(state, dict) and isinstance(state.get("approvals"), dict):
        approvals = dict(state["approvals"])
    if answer is not None and answer.call_id:
        decision: dict[str, Any] = {"approved": answer.approved, "reason": answer.reason}
        if answer.approved and answer.edited:
            decision["arguments"] = answer.arguments
        approvals[answer.call_id] = decision
    return approvals
