"""Agents and tools for the structured-event tests: token deltas, tool calls, blocking tools."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, ClassVar

from runtime_service.agents.base import StepContext, StepFailed, StepResult
from runtime_service.agents.registry import AgentRegistry
from runtime_service.domain import JSONValue
from runtime_service.step_events import OperationHalted
from runtime_service.tools import Tool, ToolContext, ToolRegistry


class DeltaAgent:
    """Passes `count` token deltas in quick succession, then ends."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        pause = float(ctx.input.get("pause", 0))
        for i in range(int(ctx.input.get("count", 200))):
            await ctx.delta(f"t{i} ")
            if pause:
                await asyncio.sleep(pause)  # a model streaming tokens
        await ctx.emit("after the deltas")
        return StepResult(output="done", done=True)


class StreamingAgent:
    """Passes deltas until stopped, recording each one delta() accepted."""

    def __init__(self) -> None:
        self.passed: dict[str, list[str]] = defaultdict(list)
        self.streaming: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        passed = self.passed[ctx.operation_id]
        i = 0
        while True:
            text = f"<{i}>"
            passed.append(text)  # passed once delta() is called, unless it refuses the text
            try:
                await ctx.delta(text)
            except OperationHalted:
                passed.pop()
                raise
            ctx.keep_on_stop({"partial": "".join(passed)})
            if i == 20:
                self.streaming[ctx.operation_id].set()
            i += 1
            await asyncio.sleep(0.001)


class ToolAgent:
    """Input {"calls": [{"name", "arguments"}...]}: runs each through call_tool, in one step;
    the outcomes are the result. {"manual": "finish" | "raise" | "step_failed" | "none"} runs
    one call by hand with tool_call instead."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        ctx.keep_on_stop({"kept": "for a stop"})
        manual = ctx.input.get("manual")
        if manual is not None:
            async with ctx.tool_call("by_hand", {"how": manual}, call_id="manual-1") as call:
                if manual == "finish":
                    call.finish({"ok": True})
                elif manual == "raise":
                    raise RuntimeError("the agent broke mid-call")
                elif manual == "raise_surrogate":  # half a UTF-16 pair: UTF-8 cannot store it
                    raise RuntimeError("the model said \ud83d")
                elif manual == "step_failed":
                    raise StepFailed("the model refused: content policy")
            return StepResult(output="manual", done=True)
        outcomes: list[JSONValue] = []
        await ctx.event("plan", {"calls": [c["name"] for c in ctx.input.get("calls", [])]})
        await ctx.delta("Let me ")
        await ctx.delta("check.")
        for spec in ctx.input.get("calls", []):
            outcome = await ctx.call_tool(spec["name"], spec.get("arguments", {}))
            outcomes.append({"ok": outcome.ok, "result": outcome.result, "error": outcome.error})
        return StepResult(state={"outcomes": outcomes}, output=outcomes, done=True)


class StubbornToolAgent:
    """Opens a tool call and ignores the stop's cancellation inside it: the runtime must settle
    the call itself when the stop grace runs out, and the agent's own exit must not add a
    second ending."""

    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        async with ctx.tool_call("stubborn", {}) as call:
            await ctx.emit("in the call")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(60)  # ignores the stop; cancelled again only at shutdown
            call.finish("too late")
        return StepResult(done=True)


class BoomTool(Tool):
    description = "Always raises."
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> JSONValue:
        raise ValueError("boom: the tool broke")


class WaitTool(Tool):
    """Waits until cancelled (a stop), reporting that it began."""

    description = "Waits forever."
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> JSONValue:
        await ctx.emit("waiting")
        await asyncio.Event().wait()
        return None


class BadSchemaTool(Tool):
    description = "Its schema is not one."
    parameters: ClassVar[dict[str, Any]] = {"type": "object", "properties": {"x": {"type": 5}}}


def tool_registry() -> ToolRegistry:
    base = ToolRegistry.load(use_entry_points=False)
    tools = {name: tool for name in base.names if (tool := base.get(name)) is not None}
    return ToolRegistry({**tools, "boom": BoomTool(), "wait": WaitTool()})


def agent_registry(streaming: StreamingAgent | None = None) -> AgentRegistry:
    return AgentRegistry(
        {
            "deltas": DeltaAgent(),
            "streaming": streaming or StreamingAgent(),
            "tools": ToolAgent(),
            "stubborn_tool": StubbornToolAgent(),
        }
    )
