"""The script a fake model follows: what each of the next requests gets back.

A script is a list of turns, consumed one per chat-completion request, in order. When it runs out
the server answers with generated text (`ServerConfig.default_tokens` tokens). Every turn has a
JSON form (`{"kind": "text" | "tool_calls" | "error", ...}`) so a test in another process can
set it over HTTP (`POST /_fake/script`) or a file can be passed to `python -m fake_llm --script`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

BreakMode = Literal["abort", "error_event"]


class ScriptError(ValueError):
    """A script in JSON form that does not describe valid turns; the message names the field."""


@dataclass(frozen=True)
class TextTurn:
    """Answer with text, streamed one token per chunk.

    `text` is split into tokens at word boundaries (each token keeps its leading space); without
    it, `tokens` generated words are sent. `tokens_per_second` overrides the server's rate (0 or
    less: as fast as possible). `break_after` ends the stream after that many tokens without
    `[DONE]`: `break_mode` "abort" drops the TCP connection (the SDK raises APIConnectionError),
    "error_event" sends an OpenAI-style `data: {"error": ...}` event (the SDK raises APIError).
    """

    text: str | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    break_after: int | None = None
    break_mode: BreakMode = "abort"
    kind: Literal["text"] = "text"


@dataclass(frozen=True)
class ToolCall:
    """One call the model asks for. `arguments` is the raw JSON text the model "writes", sent as
    is, so a test can make it malformed on purpose; `id` defaults to a generated `call_…`."""

    name: str
    arguments: str = "{}"
    id: str | None = None


@dataclass(frozen=True)
class ToolCallsTurn:
    """Ask for tool calls (finish_reason "tool_calls"), optionally after some text.

    Each call's arguments are streamed in pieces of `argument_chunk` characters, one chunk per
    token at the turn's rate, the way real models stream them."""

    calls: tuple[ToolCall, ...]
    text: str | None = None
    argument_chunk: int = 8
    tokens_per_second: float | None = None
    kind: Literal["tool_calls"] = "tool_calls"


@dataclass(frozen=True)
class ErrorTurn:
    """Answer the next `times` requests with an HTTP error: 429 (with `retry-after` /
    `retry-after-ms` from `retry_after` seconds) or any 4xx/5xx, with an OpenAI-style body."""

    status: int = 500
    message: str | None = None
    retry_after: float | None = None
    times: int = 1
    kind: Literal["error"] = "error"


Turn = TextTurn | ToolCallsTurn | ErrorTurn


def turn_to_json(turn: Turn) -> dict[str, Any]:
    """The JSON form of a turn (the inverse of `turn_from_json`)."""
    return asdict(turn)


def _check(cond: bool, where: str, problem: str) -> None:
    if not cond:
        raise ScriptError(f"{where}: {problem}")


def _opt(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if value is not None:
        _check(
            isinstance(value, kind) and not isinstance(value, bool),
            f"{where}.{key}",
            "has the wrong type",
        )
    return value


def turn_from_json(obj: object, where: str = "turn") -> Turn:
    """Parse one turn's JSON form; raises ScriptError naming the bad field."""
    _check(isinstance(obj, dict), where, "must be an object")
    assert isinstance(obj, dict)
    kind = obj.get("kind", "text")
    known: dict[str, type[Turn]] = {
        "text": TextTurn,
        "tool_calls": ToolCallsTurn,
        "error": ErrorTurn,
    }
    _check(kind in known, f"{where}.kind", f"must be one of {', '.join(known)}")
    allowed = {f.name for f in fields(known[kind])}
    unknown = sorted(set(obj) - allowed)
    _check(not unknown, where, f"unknown field(s) {', '.join(unknown)}")
    if kind == "text":
        mode = obj.get("break_mode", "abort")
        _check(mode in ("abort", "error_event"), f"{where}.break_mode", "abort or error_event")
        return TextTurn(
            text=_opt(obj, "text", str, where),
            tokens=_opt(obj, "tokens", int, where),
            tokens_per_second=_opt(obj, "tokens_per_second", (int, float), where),
            break_after=_opt(obj, "break_after", int, where),
            break_mode=mode,
        )
    if kind == "tool_calls":
        raw_calls = obj.get("calls")
        _check(isinstance(raw_calls, list) and bool(raw_calls), f"{where}.calls", "non-empty list")
        assert isinstance(raw_calls, list)
        calls = []
        for i, raw in enumerate(raw_calls):
            at = f"{where}.calls[{i}]"
            _check(isinstance(raw, dict), at, "must be an object")
            _check(isinstance(raw.get("name"), str), f"{at}.name", "must be a string")
            arguments = raw.get("arguments", "{}")
            if not isinstance(arguments, str):  # an object is a convenience: sent as its JSON
                arguments = json.dumps(arguments)
            calls.append(ToolCall(raw["name"], arguments, _opt(raw, "id", str, at)))
        chunk = _opt(obj, "argument_chunk", int, where) or 8
        _check(chunk > 0, f"{where}.argument_chunk", "must be positive")
        return ToolCallsTurn(
            calls=tuple(calls),
            text=_opt(obj, "text", str, where),
            argument_chunk=chunk,
            tokens_per_second=_opt(obj, "tokens_per_second", (int, float), where),
        )
    status = _opt(obj, "status", int, where) or 500
    _check(400 <= status <= 599, f"{where}.status", "must be an HTTP error status (400-599)")
    times = _opt(obj, "times", int, where) or 1
    _check(times > 0, f"{where}.times", "must be positive")
    return ErrorTurn(
        status=status,
        message=_opt(obj, "message", str, where),
        retry_after=_opt(obj, "retry_after", (int, float), where),
        times=times,
    )


def script_from_json(obj: object) -> list[Turn]:
    """Parse a script: a JSON list of turns."""
    _check(isinstance(obj, list), "script", "must be a list of turns")
    assert isinstance(obj, list)
    return [turn_from_json(item, f"script[{i}]") for i, item in enumerate(obj)]


@dataclass
class RequestRecord:
    """What the server saw of one chat-completion request and what it did with it.

    Times are `time.monotonic()` seconds: CLOCK_MONOTONIC is system-wide on Linux, so a client
    in another process on the same host can compare them with its own `time.monotonic()`.
    `outcome` is "pending" while the answer is being sent, then one of "completed", "rejected"
    (validation or auth; `status` says which), "error" (a scripted error), "broken" (a scripted
    break) or "client_closed" (the client closed the connection before the end:
    `client_closed_at` says when)."""

    request_id: str
    received_at: float
    model: str | None = None
    message_count: int = 0
    stream: bool = False
    status: int = 200
    turn: str | None = None
    outcome: str = "pending"
    response_started_at: float | None = None
    tokens_sent: int = 0
    ended_at: float | None = None
    client_closed_at: float | None = None
    error: str | None = None
    messages: list[Any] = field(default_factory=list)
    # The W3C trace context the client sent (a traced runtime sends its LLM span's).
    traceparent: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
