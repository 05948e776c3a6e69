"""The `llm` agent's reading of a streamed answer's server-sent events (llm_provider._chunks):
what the SDK's typed stream did for it, now done on the raw bytes."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import pytest

from runtime_service.agents.llm_provider import _chunks, _StreamBroken


class _Body(httpx2.AsyncByteStream):
    """A response body arriving in the given reads, optionally failing after them."""

    def __init__(self, reads: Sequence[bytes], fail: Exception | None = None) -> None:
        self.reads = reads
        self.fail = fail
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.closed = True


def _chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def _event(obj: object, end: str = "\n") -> bytes:
    return f"data: {json.dumps(obj)}{end}{end}".encode()


async def _read(reads: Sequence[bytes], fail: Exception | None = None) -> list[dict[str, Any]]:
    return [c async for c in _chunks(httpx2.Response(200, stream=_Body(reads, fail)))]


def _every_split(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
async def test_events_split_anywhere_across_reads(end: str) -> None:
    """Every split of the body into two reads (inside `data:`, inside the JSON, between the CR
    and the LF of a CRLF, inside `[DONE]`) yields the same chunks."""
    body = (
        _event(_chunk("one"), end)
        + _event(_chunk(" two"), end)
        + f"data: [DONE]{end}{end}".encode()
    )
    for reads in [[body], *_every_split(body), [bytes([b]) for b in body]]:
        assert await _read(reads) == [_chunk("one"), _chunk(" two")], reads


async def test_done_ends_the_stream_and_the_rest_is_not_parsed() -> None:
    assert await _read([_event(_chunk("a")), b"data: [DONE]\n\n", b"data: not json\n\n"]) == [
        _chunk("a")
    ]


async def test_comments_and_other_fields_are_ignored_and_data_lines_join() -> None:
    body = (
        b": keep-alive\n\nevent: message\nid: 7\nretry: 10\n"
        + b'data: {"choices": \ndata: []}\n\n'
        + b"data:"
        + json.dumps(_chunk("x")).encode()
        + b"\n\n"
    )
    assert await _read([body]) == [{"choices": []}, _chunk("x")]


async def test_a_last_event_without_its_blank_line_still_counts() -> None:
    assert await _read([b"data: " + json.dumps(_chunk("end")).encode()]) == [_chunk("end")]


async def test_an_error_event_names_the_providers_message() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error"}}
    with pytest.raises(_StreamBroken, match=r"^it sent an error: The server had an error$"):
        await _read([_event(_chunk("a")), _event(error)])


@pytest.mark.parametrize(
    ("data", "words"),
    [(b"data: {oops\n\n", "not JSON: "), (b"data: [1]\n\n", "not a JSON object: [1]")],
)
async def test_a_malformed_event_breaks_the_stream_in_plain_words(data: bytes, words: str) -> None:
    with pytest.raises(_StreamBroken, match=re.escape(words)):
        await _read([data])


async def test_a_read_failure_is_a_lost_connection() -> None:
    with pytest.raises(_StreamBroken, match=r"^the connection was lost \(ReadError: reset\)$"):
        await _read([_event(_chunk("a"))], httpx2.ReadError("reset"))
    with pytest.raises(_StreamBroken, match=r"^the connection timed out \(ReadTimeout"):
        await _read([], httpx2.ReadTimeout("slow"))
