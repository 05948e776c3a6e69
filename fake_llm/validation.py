"""Request validation in the real Chat Completions API's terms.

The checks that matter for an agent are the conversation rules the real API enforces: roles are
known, each message has what its role needs, and an assistant message with `tool_calls` is
followed by one `tool` message per call id (answered 400 otherwise, with the API's own wording),
and a `tool` message answers a call that was asked for. Everything else (sampling parameters,
`tools` schemas) is checked only for shape.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class InvalidRequest(Exception):
    """A 400 answer: message, param and code as the real API reports them."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def _bad_type(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}.", param, "invalid_type"
    )


def _content_ok(content: object) -> bool:
    """A string, or a list of content parts (objects with a `type`)."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in content
    )


def _tool_call_ids(message: dict[str, Any], at: str) -> list[str]:
    calls = message["tool_calls"]
    if not isinstance(calls, list):
        raise _bad_type(f"{at}.tool_calls", "an array")
    ids = []
    for j, call in enumerate(calls):
        where = f"{at}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise _bad_type(where, "an object")
        if not isinstance(call.get("id"), str):
            raise _missing(f"{where}.id")
        if call.get("type", "function") != "function":
            raise InvalidRequest(
                f"Invalid value: '{call.get('type')}'. Supported values are: 'function'.",
                f"{where}.type",
                "invalid_value",
            )
        function = call.get("function")
        if not isinstance(function, dict):
            raise _missing(f"{where}.function")
        if not isinstance(function.get("name"), str):
            raise _missing(f"{where}.function.name")
        if not isinstance(function.get("arguments"), str):
            raise _missing(f"{where}.function.arguments")
        ids.append(call["id"])
    return ids


def validate_messages(messages: object) -> None:
    """Raise InvalidRequest for a conversation the real API would refuse."""
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array")
    if not messages:
        raise InvalidRequest("[] is too short - 'messages'", "messages", "empty_array")
    pending: list[str] = []  # call ids of the last assistant message still waiting for answers
    pending_at = ""
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad_type(at, "an object")
        role = message.get("role")
        if role is None:
            raise _missing(f"{at}.role")
        if role not in ROLES:
            supported = ", ".join(f"'{r}'" for r in ROLES)
            raise InvalidRequest(
                f"Invalid value: '{role}'. Supported values are: {supported}.",
                f"{at}.role",
                "invalid_value",
            )
        if pending and role != "tool":
            raise _unanswered(pending, pending_at)
        content = message.get("content")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _missing(f"{at}.tool_call_id")
            if call_id not in pending:
                raise InvalidRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            pending.remove(call_id)
            if content is None:
                raise _missing(f"{at}.content")
        elif role == "assistant":
            if message.get("tool_calls"):
                pending = _tool_call_ids(message, at)
                pending_at = f"messages.[{i}].role"
            elif content is None:
                raise _missing(f"{at}.content")
        elif content is None:
            raise _missing(f"{at}.content")
        if content is not None and not _content_ok(content):
            raise _bad_type(f"{at}.content", "a string or an array of content parts")
    if pending:
        raise _unanswered(pending, pending_at)


def _unanswered(pending: list[str], param: str) -> InvalidRequest:
    return InvalidRequest(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to "
        "each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(pending),
        param,
    )


def validate_request(body: object) -> tuple[str, list[dict[str, Any]], bool]:
    """Check a chat-completion request body; returns (model, messages, stream)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter")
    if not isinstance(model, str):
        raise _bad_type("model", "a string")
    messages = body.get("messages")
    validate_messages(messages)
    assert isinstance(messages, list)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad_type("stream", "a boolean")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad_type("tools", "an array")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                raise _missing(f"tools[{i}].function")
            if not isinstance(tool["function"].get("name"), str):
                raise _missing(f"tools[{i}].function.name")
    return model, messages, stream
