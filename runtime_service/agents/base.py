"""The interface an agent implements. This is the whole contract between Stopline and your code.

An agent is an object with two methods:

    class MyAgent:
        def validate_input(self, input: dict) -> None:
            # Raise InvalidInput("field", "what is wrong") to reject a start request up front.
            ...

        async def step(self, ctx: StepContext) -> StepResult:
            await ctx.emit("partial output")          # stored and streamed at once
            reply = await call_llm(ctx.input, ctx.state)
            return StepResult(state={"history": ...}, output=reply, done=True)

The runtime calls `step` once per step. After each step, `state` is checkpointed, so a runtime
that restarts (or another replica) resumes at the next step with `ctx.state` restored; a step that
was in flight when a process died is run again, so steps should be safe to repeat.

Stopping: when a stop arrives mid-step the runtime cancels the `step` coroutine. The agent gets
`asyncio.CancelledError` at its current `await` and may clean up (in `finally` or an `except`
that re-raises) within the runtime's stop grace; it must not swallow the cancellation. Output
already emitted is kept; once a stop is recorded `emit` stores nothing more and raises
OperationHalted (runtime_service.runner), even before the cancellation arrives, so no output
follows the stop in the operation's events.

Structured events: `delta(text)` for a model's token deltas (buffered briefly and written as one
`text_delta` event; flushed before any other event of the step, when the stop reaches the step
and at its end, so nothing passed to delta() before the stop reached the step is lost);
`event(kind, payload)` for kinds of your own; tool calls through `tool_call` (you run the tool)
or `call_tool` (the runtime runs a registered tool). Every started tool call ends with exactly
one record: finished, failed, cancelled by a stop, or (the process died mid-call) outcome
unknown, written when the operation resumes, before the step runs again.

A step that cannot go on raises StepFailed("why"): the operation ends FAILED with that message.

Waiting for a person: a step may end by asking (`StepResult(state=..., ask=InputRequest.approval(
...))` or `InputRequest.question(...)`). Its state is checkpointed, the request goes out as an
`input_requested` event, and the operation is WAITING, holding no slot and no coroutine. When the
request is answered (or expires and takes its default) the operation resumes on any replica and
the next step finds the resolution in `ctx.answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from runtime_service.domain import JSONValue


class InvalidInput(ValueError):
    """Raised by validate_input; `field` is a path inside the input (e.g. "input.steps")."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


class StepFailed(Exception):
    """Raised by a step to end the operation FAILED with exactly `message` (no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class ToolCall:
    """A tool call in progress (see StepContext.tool_call): finish or fail it before it ends."""

    call_id: str
    name: str
    arguments: JSONValue
    result: JSONValue = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    ended: bool = field(default=False, init=False)

    def finish(self, result: JSONValue) -> None:
        self.result, self.error, self.ended = result, None, True

    def fail(self, error: str) -> None:
        self.result, self.error, self.ended = None, str(error), True


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """How a call_tool() call ended (a stop raises CancelledError instead)."""

    call_id: str
    ok: bool
    result: JSONValue = None
    error: str | None = None
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A registered tool as a model is told of it: `parameters` is its arguments' JSON schema
    (an object schema)."""

    name: str
    description: str
    parameters: dict[str, Any]
    needs_approval: bool = False


class StepEvents(Protocol):
    """Where a StepContext's events go: the runtime's writer (runtime_service.step_events), or
    a test's fake."""

    async def emit(self, text: str) -> None: ...

    async def delta(self, text: str) -> None: ...

    async def event(self, kind: str, payload: JSONValue) -> None: ...

    def tool_call(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> AbstractAsyncContextManager[ToolCall]: ...

    async def call_tool(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> ToolOutcome: ...

    def tool_specs(self, names: Sequence[str] | None = None) -> list[ToolSpec]: ...


@dataclass(frozen=True, slots=True)
class Kept:
    """The state a step kept for a stop (see StepContext.keep_on_stop)."""

    state: JSONValue


@dataclass(slots=True)
class StepContext:
    """What an agent sees while it takes a step."""

    operation_id: str
    step: int
    input: dict[str, Any]
    state: JSONValue
    _events: StepEvents = field(repr=False)
    # Call ids an earlier attempt of this step started and that were settled
    # `tool_call_outcome_unknown` (the process running them died): the tool may or may not have
    # taken effect. An agent that reran them would repeat their effects and reuse their ids, so
    # it should treat them as done with an unknown result (the llm agent tells the model so).
    unknown_calls: frozenset[str] = frozenset()
    # The resolution of the input request the previous step ended with, if it asked.
    answer: Answered | None = None
    kept: Kept | None = field(default=None, init=False, repr=False)

    async def emit(self, text: str) -> None:
        """Store and stream a piece of output now (not at the end of the step)."""
        await self._events.emit(text)

    async def delta(self, text: str) -> None:
        """A token delta of a model's answer: buffered for a few milliseconds (or characters)
        and written with its neighbours as one `text_delta` event."""
        await self._events.delta(text)

    async def event(self, kind: str, payload: JSONValue) -> None:
        """An event of a kind of your own, with a JSON payload, stored now."""
        await self._events.event(kind, payload)

    def tool_call(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> AbstractAsyncContextManager[ToolCall]:
        """`async with ctx.tool_call(name, args) as call:` records the call started; inside, run
        the tool and call.finish(result) or call.fail(error). On exit it is recorded finished or
        failed as set; an exception fails it (and propagates); a stop records it cancelled
        (CancelledError propagates); neither finish nor fail -> failed."""
        return self._events.tool_call(name, arguments, call_id)

    async def call_tool(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> ToolOutcome:
        """Run a registered tool in a tool_call: `arguments` (an object, or the JSON text of
        one) are checked against its schema first. Bad arguments, an unknown tool or a tool
        that raises give a failed outcome, never an exception; a stop cancels the call (a
        blocking tool's process is killed) and raises CancelledError after it is recorded."""
        return await self._events.call_tool(name, arguments, call_id)

    def tool_specs(self, names: Sequence[str] | None = None) -> list[ToolSpec]:
        """The registered tools (all, or those named; an unknown name raises KeyError)."""
        return self._events.tool_specs(names)

    def keep_on_stop(self, state: JSONValue) -> None:
        """The state to store if a stop cuts this step (e.g. the conversation with the partial
        answer), readable as Operation.state. Without it the last checkpoint's state stays."""
        self.kept = Kept(state)


APPROVAL = "approval"
ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class InputRequest:
    """A question a step ends with (StepResult.ask). Build one with approval() or question().

    `expires_in`: seconds until the request takes `default` (None: the runtime's
    input_expiry_seconds). `default`: the stored answer an expiry gives, as AnswerInput stores
    one: {"approved": bool, "reason": str} for an approval (None: rejected), {"value": ...} for
    a question (None: {"value": null})."""

    kind: str
    prompt: str
    call_id: str = ""
    tool_name: str = ""
    arguments: JSONValue = None
    schema: dict[str, Any] | None = None
    expires_in: float | None = None
    default: dict[str, JSONValue] | None = None

    @classmethod
    def approval(
        cls,
        call_id: str,
        tool_name: str,
        arguments: JSONValue,
        prompt: str = "",
        schema: dict[str, Any] | None = None,
        expires_in: float | None = None,
        approve_on_expiry: bool = False,
    ) -> InputRequest:
        """Ask to run a tool call; `schema` (the tool's parameters) checks edited arguments."""
        default: dict[str, JSONValue] = (
            {"approved": True, "reason": "approved by default: nobody answered in time"}
            if approve_on_expiry
            else {"approved": False, "reason": "rejected by default: nobody answered in time"}
        )
        prompt = prompt or f"Run {tool_name}?"
        return cls(APPROVAL, prompt, call_id, tool_name, arguments, schema, expires_in, default)

    @classmethod
    def question(
        cls,
        prompt: str,
        schema: dict[str, Any] | None = None,
        expires_in: float | None = None,
        default: JSONValue = None,
    ) -> InputRequest:
        """Ask for a free answer (any JSON value, checked against `schema` when given)."""
        return cls(ANSWER, prompt, schema=schema, expires_in=expires_in, default={"value": default})


@dataclass(frozen=True, slots=True)
class Answered:
    """How the previous step's input request was resolved (StepContext.answer).

    For an approval: `approved`, `reason`, and `arguments` (the edited arguments, or the ones
    asked for). For a question: `value`. `expired`: nobody answered in time and this is the
    request's default."""

    request_id: str
    kind: str
    step: int
    call_id: str
    approved: bool
    reason: str
    arguments: JSONValue
    value: JSONValue
    expired: bool
    answered_by: str
    # The person edited the arguments (`arguments` are theirs, not the ones asked for).
    edited: bool = False


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step returns: the state to checkpoint, its output, and whether the agent is done.
    The output of the final step is the operation's result. Both must be JSON-serialisable.
    `ask`: end the step by asking a person (see InputRequest); the operation waits."""

    state: JSONValue = None
    output: JSONValue = None
    done: bool = False
    ask: InputRequest | None = None


@runtime_checkable
class Agent(Protocol):
    def validate_input(self, input: dict[str, Any]) -> None: ...

    async def step(self, ctx: StepContext) -> StepResult: ...
