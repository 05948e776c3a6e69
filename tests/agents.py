"""Agents that let tests steer a step from outside: finish it on cue, ignore a stop, misbehave."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime_service.agents.base import StepContext, StepResult
from runtime_service.agents.builtin import EchoAgent, TickerAgent
from runtime_service.agents.registry import AgentRegistry


class GatedAgent:
    """Each step emits a chunk, then waits until the test lets that operation's next step end."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Semaphore] = {}
        self.steps_started: list[tuple[str, int]] = []
        self.cleaned_up: list[tuple[str, int]] = []

    def gate(self, operation_id: str) -> asyncio.Semaphore:
        return self.gates.setdefault(operation_id, asyncio.Semaphore(0))

    def release(self, operation_id: str, steps: int = 1) -> None:
        """Let the next `steps` steps of the operation finish."""
        for _ in range(steps):
            self.gate(operation_id).release()

    def open(self, operation_id: str) -> None:
        self.release(operation_id, 10_000)

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        self.steps_started.append((ctx.operation_id, ctx.step))
        await ctx.emit(f"gated step {ctx.step}")
        try:
            await self.gate(ctx.operation_id).acquire()
        finally:
            self.cleaned_up.append((ctx.operation_id, ctx.step))
        steps = int(ctx.input.get("steps", 1))
        return StepResult(state={"done": ctx.step + 1}, output=ctx.step, done=ctx.step + 1 >= steps)


class StubbornAgent:
    """Swallows the first cancellation and keeps working: the grace period must bound the halt."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        await ctx.emit("working")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # ignores the stop; cancelled again only by shutdown
        return StepResult(done=True)


class CarefulAgent:
    """Cleans up after its cancellation with an await of its own (closing a stream, ending a
    process) and counts the cancellations it saw, so a test can tell one from two."""

    def __init__(self) -> None:
        self.cancellations: dict[str, int] = {}
        self.cleaned_up: set[str] = set()

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        await ctx.emit("working")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancellations[ctx.operation_id] = 1
            try:
                await asyncio.sleep(0.05)  # the clean-up's own await
            except asyncio.CancelledError:
                self.cancellations[ctx.operation_id] += 1
                raise
            self.cleaned_up.add(ctx.operation_id)
            raise
        return StepResult(done=True)


class UnserialisableAgent:
    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        if ctx.input.get("raise_surrogate"):
            raise RuntimeError("the model said \ud83d")
        if ctx.input.get("surrogate"):
            # Valid in a Python str, not in UTF-8: half of an emoji's UTF-16 pair.
            return StepResult(state={"bad": "\ud83d"}, done=True)
        return StepResult(state={"bad": object()}, done=True)


def registry(gated: GatedAgent | None = None) -> AgentRegistry:
    return AgentRegistry(
        {
            "echo": EchoAgent(),
            "ticker": TickerAgent(),
            "gated": gated or GatedAgent(),
            "stubborn": StubbornAgent(),
            "unserialisable": UnserialisableAgent(),
        }
    )
