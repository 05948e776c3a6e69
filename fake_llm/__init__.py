"""A local OpenAI-compatible Chat Completions server (scripted answers, tool calls, faults, and a
record of when each client closed its connection) for Stopline's demo, tests and benchmarks."""

from fake_llm.script import (
    ErrorTurn,
    RequestRecord,
    ScriptError,
    TextTurn,
    ToolCall,
    ToolCallsTurn,
    Turn,
    script_from_json,
    turn_from_json,
    turn_to_json,
)
from fake_llm.server import FakeLLM, ServerConfig

__all__ = [
    "ErrorTurn",
    "FakeLLM",
    "RequestRecord",
    "ScriptError",
    "ServerConfig",
    "TextTurn",
    "ToolCall",
    "ToolCallsTurn",
    "Turn",
    "script_from_json",
    "turn_from_json",
    "turn_to_json",
]
