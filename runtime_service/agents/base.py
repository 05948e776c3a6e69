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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from runtime_service.domain import JSONValue


class InvalidInput(ValueError):
    """Raised by validate_input; `field` is a path inside the input (e.g. "input.steps")."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


@dataclass(slots=True)
class StepContext:
    """What an agent sees while it takes a step."""

    operation_id: str
    step: int
    input: dict[str, Any]
    state: JSONValue
    _emit: Callable[[str], Awaitable[None]] = field(repr=False)

    async def emit(self, text: str) -> None:
        """Store and stream a piece of output now (not at the end of the step)."""
        await self._emit(text)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step returns: the state to checkpoint, its output, and whether the agent is done.
    The output of the final step is the operation's result. Both must be JSON-serialisable."""

    state: JSONValue = None
    output: JSONValue = None
    done: bool = False


@runtime_checkable
class Agent(Protocol):
    def validate_input(self, input: dict[str, Any]) -> None: ...

    async def step(self, ctx: StepContext) -> StepResult: ...
