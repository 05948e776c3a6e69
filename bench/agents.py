"""Agents for benchmarks: steps that cost nothing, so what is measured is Stopline itself."""

from __future__ import annotations

from typing import Any

from runtime_service.agents.base import StepContext, StepResult


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
