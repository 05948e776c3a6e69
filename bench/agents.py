"""Agents for benchmarks: steps that cost nothing, so what is measured is Stopline itself."""

from __future__ import annotations

from typing import Any

from runtime_service.agents.base import InputRequest, StepContext, StepResult


class NoopAgent:
    """`steps` steps (default 1000) that return at once, each emitting `chunks` chunks of
    `chunk_bytes` characters (default none): per-step overhead and event throughput."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        chunk = "x" * int(ctx.input.get("chunk_bytes", 64))
        for _ in range(int(ctx.input.get("chunks", 0))):
            await ctx.emit(chunk)
        done = ctx.step + 1 >= int(ctx.input.get("steps", 1000))
        return StepResult(state=None, output=None, done=done)


class AskAgent:
    """Asks a person at its first step (an approval nobody gives, expiring in a day), then ends
    with what it got: an operation that spends its life WAITING (issue 15's capacity figure)."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        if ctx.answer is None:
            ask = InputRequest.approval("call-1", "send", {"amount": 1}, expires_in=86400)
            return StepResult(state=None, output=None, ask=ask)
        return StepResult(output=ctx.answer.approved, done=True)
