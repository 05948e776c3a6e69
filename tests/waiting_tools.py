"""A tool that needs a person's approval and records every run, for the waiting tests: in memory
(`SendTool.runs`), and, when STOPLINE_TEST_SEND_LOG names a file, one JSON line per run there
(runtimes in other processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from runtime_service.domain import JSONValue
from runtime_service.tools import Tool, ToolContext


class SendTool(Tool):
    description = "Send money (irreversible): a person approves every call."
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"to": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}},
        "required": ["to", "amount"],
        "additionalProperties": False,
    }
    needs_approval = True
    runs: ClassVar[list[dict[str, Any]]] = []

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> JSONValue:
        SendTool.runs.append(arguments)
        log = os.environ.get("STOPLINE_TEST_SEND_LOG")
        if log:
            with Path(log).open("a") as f:  # noqa: ASYNC230 (a test's small append)
                f.write(json.dumps(arguments) + "\n")
        return {"sent": arguments["amount"], "to": arguments["to"]}
