"""How the runtime runs a registered tool: arguments parsed and checked against the tool's JSON
schema (a model's bad arguments are a failed call, with a message naming the argument), async
tools on the event loop, blocking ones in the worker pool (runtime_service.workers), which the
toolbox owns: started on the first blocking call, closed with the runtime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from runtime_service.agents.base import ToolSpec
from runtime_service.domain import JSONValue
from runtime_service.tools.base import Tool
from runtime_service.tools.registry import ToolRegistry
from runtime_service.workers import WorkerError, WorkerPool

Emit = Callable[[str], Awaitable[None]]


class ToolFailed(Exception):
    """A tool call that did not produce a result; the message says why (recorded as failed)."""


def parse_arguments(arguments: JSONValue) -> dict[str, Any]:
    """A model's arguments (an object, or the JSON text of one) as a dict; ToolFailed if not."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ToolFailed(f"the arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ToolFailed(f"the arguments must be a JSON object, not {_json_type(arguments)}")
    return arguments


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _where(error: ValidationError) -> str:
    path = "arguments"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


class _Progress:
    def __init__(self, emit: Emit) -> None:
        self.emit = emit


class ToolBox:
    """The runtime's tools and the worker pool their blocking calls run in."""

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        pool_size: int = 1,
        max_workers: int = 8,
        stop_grace: float = 1.0,
    ) -> None:
        self.registry = registry
        self._pool_size = pool_size
        self._max_workers = max(max_workers, pool_size, 1)
        self._stop_grace = stop_grace
        self._pool: WorkerPool | None = None
        self._starting = asyncio.Lock()
        self._validators: dict[str, Draft202012Validator] = {}

    def get(self, name: str) -> Tool | None:
        return self.registry.get(name)

    def specs(self, names: Sequence[str] | None = None) -> list[ToolSpec]:
        return self.registry.specs(names)

    def check(self, name: str, tool: Tool, arguments: dict[str, Any]) -> None:
        """ToolFailed naming the first argument that does not match the tool's schema."""
        validator = self._validators.get(name)
        if validator is None:
            validator = self._validators[name] = Draft202012Validator(tool.parameters)
        errors = sorted(
            validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path]
        )
        if errors:
            first = errors[0]
            raise ToolFailed(f"{_where(first)}: {first.message}")

    async def run(self, tool: Tool, arguments: dict[str, Any], emit: Emit) -> JSONValue:
        """The tool's result, or ToolFailed; a cancellation (a stop) propagates, after a blocking
        call's process is gone (given the stop grace, then killed)."""
        if not tool.blocking:
            result = await tool.run(arguments, _Progress(emit))
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ToolFailed(f"the tool returned a result that is not JSON: {exc}") from None
            return result
        pool = await self.pool()
        try:
            return await pool.call(
                tool.function, arguments, on_output=emit, time_limit=tool.time_limit(arguments)
            )
        except WorkerError as exc:
            raise ToolFailed(str(exc)) from None

    async def pool(self) -> WorkerPool:
        """The worker pool, started on first use (most runtimes never run a blocking tool)."""
        async with self._starting:
            if self._pool is None:
                pool = WorkerPool(
                    size=self._pool_size, max_workers=self._max_workers, grace=self._stop_grace
                )
                await pool.start()
                self._pool = pool
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
