"""The `llm` agent's conversation rules: OpenAI chat messages the Chat Completions API accepts.

Checked when an operation starts so that a conversation the provider would refuse (most often an
assistant message whose tool calls are not all answered by tool messages) is an INVALID_ARGUMENT
naming the message, not a FAILED operation after a round trip to the provider. The same rules
say which tool calls a step still has to run and what a conversation cut by a stop must contain.
"""

from __future__ import annotations

from typing import Any

from runtime_service.agents.base import InvalidInput
from stopline.json_values import shown

ROLES = ("system", "developer", "user", "assistant", "tool")

# The answer a tool call gets when a stop cut it or came before it ran.
CANCELLED_BY_STOP = "cancelled by a stop"


def _content_ok(content: object) -> bool:
    """A string, or a list of content parts (objects with a string `type`)."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in content
    )


def _check_content(message: dict[str, Any], at: str, *, required: bool) -> None:
    content = message.get("content")
    if content is None:
        if required:
            raise InvalidInput(f"{at}.content", "is required for this role")
        return
    if not _content_ok(content):
        raise InvalidInput(
            f"{at}.content",
            f"must be a string or a list of content parts, got {shown(content)}",
        )


def _tool_call_ids(message: dict[str, Any], at: str) -> list[str]:
    calls = message["tool_calls"]
    if not isinstance(calls, list):
        raise InvalidInput(f"{at}.tool_calls", f"must be a list, got {shown(calls)}")
    ids: list[str] = []
    for j, call in enumerate(calls):
        where = f"{at}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise InvalidInput(where, f"must be an object, got {shown(call)}")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidInput(f"{where}.id", "must be a non-empty string")
        if call_id in ids:
            raise InvalidInput(f"{where}.id", f"repeats the call id {shown(call_id)}")
        if call.get("type", "function") != "function":
            raise InvalidInput(f"{where}.type", 'must be "function"')
        function = call.get("function")
        if not isinstance(function, dict):
            raise InvalidInput(f"{where}.function", "must be an object with name and arguments")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidInput(f"{where}.function.name", "must be a non-empty string")
        if not isinstance(function.get("arguments"), str):
            raise InvalidInput(
                f"{where}.function.arguments", "must be a string (the arguments' JSON text)"
            )
        ids.append(call_id)
    return ids


def validate_messages(messages: object, field: str = "input.messages") -> None:
    """Raise InvalidInput, naming the message and field, for a conversation the API would refuse."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(field, "must be a non-empty list of chat messages")
    pending: list[str] = []  # call ids of the last assistant message not answered yet
    pending_at = ""
    for i, message in enumerate(messages):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise InvalidInput(at, f"must be an object, got {shown(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidInput(
                f"{at}.role", f"must be one of {', '.join(ROLES)}, got {shown(role)}"
            )
        if pending and role != "tool":
            raise _unanswered(pending, pending_at, at)
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidInput(f"{at}.name", f"must be a string, got {shown(name)}")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise InvalidInput(f"{at}.tool_call_id", "must be a string")
            if call_id not in pending:
                raise InvalidInput(
                    f"{at}.tool_call_id",
                    f"{shown(call_id)} answers no tool call of the assistant message before it",
                )
            pending.remove(call_id)
            _check_content(message, at, required=True)
        elif role == "assistant" and message.get("tool_calls"):
            pending, pending_at = _tool_call_ids(message, at), at
            _check_content(message, at, required=False)
        else:
            _check_content(message, at, required=True)
    if pending:
        raise _unanswered(pending, pending_at, None)


def _unanswered(pending: list[str], at: str, before: str | None) -> InvalidInput:
    where = f"before {before}" if before else "at the end of the conversation"
    return InvalidInput(
        f"{at}.tool_calls",
        "an assistant message with tool_calls must be followed by a tool message for each call "
        f"id; no answer {where} for: {', '.join(pending)}",
    )


def unanswered_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool calls of the last assistant message that no tool message after it answers yet
    (empty when the conversation does not end with an assistant's tool calls)."""
    answered: set[str] = set()
    for message in reversed(messages):
        role = message.get("role")
        if role == "tool":
            answered.add(str(message.get("tool_call_id")))
            continue
        if role == "assistant" and message.get("tool_calls"):
            calls: list[dict[str, Any]] = message["tool_calls"]
            return [call for call in calls if call.get("id") not in answered]
        return []
    return []


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}
