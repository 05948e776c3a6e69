"""JSON values across the protobuf boundary, and values shown to callers, in one place.

`google.protobuf.Struct` and `Value` carry every number as a double, so `{"a": 1}` comes out of
protobuf's own conversion as `{"a": 1.0}`. JSON has one number type, and a caller who sent `1`
expects `1` back (agents too: `range(input["steps"])` should just work). Every place where a
Struct or Value becomes Python goes through `struct_to_python`/`value_to_python`, and every value
quoted in an error message goes through `shown`, so callers see JSON, never a Python repr.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from google.protobuf import json_format, struct_pb2

# Past 2**53 a double no longer holds every integer, so an integral-looking double there may not
# be the integer the caller wrote: leave it a float rather than invent digits.
_EXACT_INTEGERS = 2**53


def json_numbers(value: Any) -> Any:
    """`value` (as json.loads or protobuf's MessageToDict gives it) with every integral float
    within +-2**53 made an int; everything else unchanged. Iterative: input can nest deeply."""
    if isinstance(value, float):
        return _number(value)
    if not isinstance(value, dict | list):
        return value
    root: Any = value.copy()
    pending: list[Any] = [root]
    while pending:
        container = pending.pop()
        keys = container.keys() if isinstance(container, dict) else range(len(container))
        for key in keys:
            item = container[key]
            if isinstance(item, float):
                container[key] = _number(item)
            elif isinstance(item, dict | list):
                container[key] = item.copy()
                pending.append(container[key])
    return root


def _number(value: float) -> int | float:
    if value.is_integer() and -_EXACT_INTEGERS <= value <= _EXACT_INTEGERS:
        return int(value)
    return value


def struct_to_python(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, integral numbers as ints. ValueError for NaN or Infinity,
    which JSON cannot hold."""
    result: dict[str, Any] = json_numbers(json_format.MessageToDict(value))
    return result


def value_to_python(value: struct_pb2.Value) -> Any:
    """A Value (a step's output, a result) as plain Python, integral numbers as ints."""
    return json_numbers(json_format.MessageToDict(value))


def message_to_python(message: Any, **options: Any) -> Any:
    """Any message in protobuf's JSON mapping (`--json` output), integral numbers as ints."""
    return json_numbers(json_format.MessageToDict(message, **options))


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# One C encoder, built once, for every dump_json: json.dumps with any option builds a
# JSONEncoder per call, and JSONEncoder.encode builds its C encoder per call again, which
# together cost more than the encoding on the runner's per-step path (several dumps a step).
# Its arguments: no circular-reference markers (a cycle ends in RecursionError instead, which
# json_problem reports alike), no indent, compact separators, keys unsorted, none skipped, NaN
# and Infinity refused. It keeps no state between calls, so threads can share it.
_ENCODE: Callable[[Any, int], Iterable[str]]
if c_make_encoder is not None:
    _ENCODE = c_make_encoder(None, _refuse, encode_basestring, None, ":", ",", False, False, False)
else:  # a Python without the json C accelerator: the same text, more slowly
    _FALLBACK = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def _ENCODE(value: Any, _level: int) -> Iterable[str]:
        return (_FALLBACK.encode(value),)


def dump_json(value: Any) -> str:
    """`value` as compact JSON, as it is stored and measured: no spaces, UTF-8 text kept as is,
    NaN and Infinity refused (ValueError), as JSON cannot hold them, and so is text with a lone
    surrogate (ValueError), which UTF-8 cannot hold: the database driver would refuse it in the
    middle of a write (a step state holding one crashed the run, and its resume, every time)."""
    text = "".join(_ENCODE(value, 0))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(exc.object[exc.start])
            raise ValueError(
                f"text holds a lone surrogate (U+{code:04X}, half of a UTF-16 pair), "
                "which UTF-8 cannot store"
            ) from None
    return text


def storable_text(text: str) -> str:
    """`text` with each lone surrogate (which UTF-8 cannot store, see dump_json) written as its
    escape, `\\ud83d`: for messages Stopline stores on an agent's behalf (a step's error), which
    must be stored whatever they hold."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_problem(value: Any) -> str | None:
    """Why `value` cannot be stored as JSON (dump_json's error), or None if it can."""
    try:
        dump_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)
    return None


def shown(value: Any, limit: int = 64) -> str:
    """`value` as JSON for an error message (`null`, `true`, `[1]`, `1000000`, `"text"`), a
    string cut to `limit` characters (other values' JSON likewise) so a huge value cannot flood
    the message or be echoed back whole."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit] + "…"
    try:
        text = json.dumps(json_numbers(value), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(str(value)[:limit], ensure_ascii=False)
    return text if isinstance(value, str) or len(text) <= limit else text[:limit] + "…"
