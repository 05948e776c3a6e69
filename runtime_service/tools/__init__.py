"""Tools agents call through StepContext.call_tool: the interface (base.py), the registry
(registry.py), the built-ins (builtin.py) and how the runtime runs them (toolbox.py)."""

from runtime_service.tools.base import Tool, ToolContext
from runtime_service.tools.registry import ENTRY_POINT_GROUP, ToolLoadError, ToolRegistry

__all__ = ["ENTRY_POINT_GROUP", "Tool", "ToolContext", "ToolLoadError", "ToolRegistry"]
