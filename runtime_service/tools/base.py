"""What a tool is. A tool has a description and a JSON schema for its arguments (what a model is
told), and either runs on the event loop (`async def run`) or is blocking: it names a function
"package.module:function" that the runtime runs in a worker process as function(arguments, emit),
so a stop can kill it (a thread could not be stopped). Arguments and results are JSON.

    class Weather(Tool):
        description = "The weather in a city"
        parameters = {"type": "object", "properties": {"city": {"type": "string"}},
                      "required": ["city"], "additionalProperties": False}

        async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> JSONValue:
            await ctx.emit(f"looking up {arguments['city']}")   # progress output
            return {"city": arguments["city"], "sky": "clear"}

    class Crunch(Tool):
        description = "Blocking number crunching"
        parameters = {"type": "object"}
        function = "mypackage.crunch:crunch"   # crunch(arguments, emit) -> JSON, in a worker
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

from runtime_service.domain import JSONValue


class ToolContext(Protocol):
    """What a running tool sees: where its progress output goes."""

    @property
    def emit(self) -> Callable[[str], Awaitable[None]]:
        """`await ctx.emit(text)`: progress output, stored and streamed at once."""
        ...


class Tool:
    """Subclass and set `description`, `parameters`, and either `run` or `function`."""

    description: ClassVar[str] = ""
    # The arguments' JSON schema (an object schema); checked before the tool runs.
    parameters: ClassVar[dict[str, Any]] = {"type": "object"}
    # "package.module:function" for a blocking tool (run in a worker process); "" for async.
    function: ClassVar[str] = ""
    # Whether a person must approve a call (reported in ToolSpec; enforced by a later issue).
    needs_approval: ClassVar[bool] = False

    @property
    def blocking(self) -> bool:
        return bool(self.function)

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> JSONValue:
        raise NotImplementedError(f"{type(self).__name__} sets neither run() nor function")

    def time_limit(self, arguments: dict[str, Any]) -> float | None:
        """How long a blocking call may run (None: no limit of its own)."""
        return None
