"""Built-in agents: `echo` (one step) and `ticker` (long steps that emit output as they go)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from runtime_service.agents.base import InvalidInput, StepContext, StepResult
from stopline.json_values import shown


class EchoAgent:
    """Returns its input in a single step: the smallest useful agent."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        await ctx.emit("echo")
        return StepResult(state=None, output=ctx.input, done=True)


_PLAIN_NUMBERS = (int, float)


def _number(
    input: dict[str, Any], key: str, default: float, *, minimum: float, maximum: float
) -> float:
    value = input.get(key, default)
    if type(value) in _PLAIN_NUMBERS and minimum <= value <= maximum:
        # The common case, in one test: not a bool (its type is bool), and a NaN or an
        # infinity fails the range. The ticker reads its input every step.
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"input.{key}", f"must be a number, got {shown(value)}")
    if not minimum <= value <= maximum:
        raise InvalidInput(
            f"input.{key}",
            f"must be between {shown(minimum)} and {shown(maximum)}, got {shown(value)}",
        )
    return float(value)


class TickerAgent:
    """A stand-in for a long LLM or tool call, for demos, tests and benchmarks.

    Input (all optional): `steps` (default 3), `step_seconds` (default 1.0) and
    `chunk_interval_seconds` (default: step_seconds / 4). Each step emits a chunk at once and then
    every interval until the step's time is up; the state counts the chunks so far. Set
    `fail_at_step` to make that step raise, to exercise the FAILED path.
    """

    def validate_input(self, input: dict[str, Any]) -> None:
        self._settings(input)

    @staticmethod
    def _settings(input: dict[str, Any]) -> tuple[int, float, float, int | None]:
        steps = _number(input, "steps", 3, minimum=1, maximum=1_000_000)
        if steps != int(steps):
            raise InvalidInput("input.steps", f"must be a whole number, got {shown(steps)}")
        step_seconds = _number(input, "step_seconds", 1.0, minimum=0, maximum=86_400)
        interval = _number(
            input, "chunk_interval_seconds", step_seconds / 4, minimum=0, maximum=86_400
        )
        fail_at: int | None = None
        if "fail_at_step" in input:
            fail_at = int(_number(input, "fail_at_step", 0, minimum=0, maximum=1_000_000))
        return int(steps), step_seconds, interval, fail_at

    async def step(self, ctx: StepContext) -> StepResult:
        steps, step_seconds, interval, fail_at = self._settings(ctx.input)
        ticks = int(ctx.state["ticks"]) if isinstance(ctx.state, dict) else 0
        if fail_at is not None and ctx.step == fail_at:
            raise RuntimeError(f"ticker was asked to fail at step {fail_at}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + step_seconds
        chunk = 0
        while True:
            await ctx.emit(f"step {ctx.step} tick {chunk}")
            ticks += 1
            chunk += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(interval, remaining) if interval > 0 else remaining)
            if loop.time() >= deadline:
                break
        done = ctx.step + 1 >= steps
        return StepResult(
            state={"ticks": ticks}, output={"step": ctx.step, "ticks": ticks}, done=done
        )
