"""Resolve tool names to tools, like agents (runtime_service.agents.registry): the built-ins, the
`stopline.tools` entry-point group, then `name=package.module:attr` specs from the operator's
`--tool` flags, later ones overriding earlier. A model only ever names a registered tool."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from runtime_service.agents.base import ToolSpec
from runtime_service.config import DEFAULT_PYTHON_TOOL_MAX_SECONDS
from runtime_service.plugins import import_plugin, load_plugins
from runtime_service.tools.base import Tool
from runtime_service.tools.builtin import PythonTool, SleepTool
from stopline.json_values import shown

ENTRY_POINT_GROUP = "stopline.tools"


class ToolLoadError(Exception):
    """An operator-given tool cannot be loaded; raised at start-up, never per request."""


def _instantiate(obj: Any, origin: str) -> Tool:
    tool = obj() if isinstance(obj, type) else obj
    if not isinstance(tool, Tool):
        raise ToolLoadError(f"{origin} is not a tool: subclass runtime_service.tools.Tool")
    if not isinstance(tool.parameters, dict) or tool.parameters.get("type") != "object":
        raise ToolLoadError(f"{origin}: parameters must be a JSON schema of type object")
    try:
        Draft202012Validator.check_schema(tool.parameters)
    except SchemaError as exc:
        raise ToolLoadError(
            f"{origin}: parameters is not a valid JSON schema: {exc.message}"
        ) from None
    return tool


def import_tool(spec: str) -> Tool:
    """Load `package.module:attr` (a Tool subclass, which is instantiated, or a Tool)."""
    return import_plugin(spec, "tool", _instantiate, ToolLoadError)


class ToolRegistry:
    def __init__(self, tools: Mapping[str, Tool]) -> None:
        self._tools = dict(tools)

    @classmethod
    def load(
        cls,
        specs: Iterable[str] = (),
        *,
        python_max_seconds: float = DEFAULT_PYTHON_TOOL_MAX_SECONDS,
        use_entry_points: bool = True,
    ) -> ToolRegistry:
        """Built-ins, then entry points, then `name=module:attr` specs from configuration."""
        tools: dict[str, Tool] = {
            "python": PythonTool(python_max_seconds),
            "sleep": SleepTool(),
        }
        return cls(
            load_plugins(
                tools,
                ENTRY_POINT_GROUP,
                specs,
                "tool",
                _instantiate,
                ToolLoadError,
                use_entry_points,
            )
        )

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def specs(self, names: Sequence[str] | None = None) -> list[ToolSpec]:
        """The named tools as a model is told of them (all when `names` is None); KeyError
        naming the first unknown one."""
        chosen = self.names if names is None else list(names)
        specs = []
        for name in chosen:
            tool = self._tools.get(name)
            if tool is None:
                raise KeyError(f"no tool named {shown(name)} is registered")
            specs.append(
                ToolSpec(name, tool.description, dict(tool.parameters), tool.needs_approval)
            )
        return specs
