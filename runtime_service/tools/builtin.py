"""The built-in tools: `python` (blocking: a snippet in a worker process, with a time limit) and
`sleep` (async: waits, reporting progress; the demo's slow tool)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Callable
from typing import Any, ClassVar

from runtime_service.config import DEFAULT_PYTHON_TOOL_MAX_SECONDS
from runtime_service.domain import JSONValue
from runtime_service.tools.base import Tool, ToolContext


class PythonTool(Tool):
    DEFAULT_SECONDS: ClassVar[float] = 10.0

    description = (
        "Run a Python snippet in a separate process and return what it printed and the value "
        "of its `result` variable. The process is killed when the time limit runs out or the "
        "operation is stopped."
    )
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "description": "Python source to run"},
            "timeout_seconds": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "time limit (capped by the runtime's setting)",
            },
        },
        "required": ["code"],
        "additionalProperties": False,
    }
    function = "runtime_service.tools.builtin:run_snippet"

    def __init__(self, max_seconds: float = DEFAULT_PYTHON_TOOL_MAX_SECONDS) -> None:
        self.max_seconds = max_seconds

    def time_limit(self, arguments: dict[str, Any]) -> float | None:
        asked = float(arguments.get("timeout_seconds", self.DEFAULT_SECONDS))
        return min(asked, self.max_seconds)


class _Emitting(io.TextIOBase):
    """stdout that also reports each complete line as progress while the snippet runs."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self.captured = io.StringIO()
        self._line = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.captured.write(text)
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush_line(self) -> None:
        if self._line:
            self._emit(self._line)
            self._line = ""


def run_snippet(arguments: dict[str, Any], emit: Callable[[str], None]) -> JSONValue:
    """The python tool's body, in a worker process: exec the code with stdout captured (each
    line emitted as it is printed) and return {"output": ..., "result": ...}."""
    out = _Emitting(emit)
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(arguments["code"], "<snippet>", "exec"), namespace)
        finally:
            out.flush_line()
    result = namespace.get("result")
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError):
        result = repr(result)
    return {"output": out.captured.getvalue(), "result": result}


class SleepTool(Tool):
    description = "Wait for a number of seconds, reporting progress every second."
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
        "required": ["seconds"],
        "additionalProperties": False,
    }

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> JSONValue:
        seconds = float(arguments["seconds"])
        waited = 0.0
        while waited < seconds:
            chunk = min(1.0, seconds - waited)
            await asyncio.sleep(chunk)
            waited += chunk
            await ctx.emit(f"slept {waited:g} of {seconds:g} s")
        return {"slept_seconds": seconds}
