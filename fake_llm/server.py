"""An OpenAI-compatible Chat Completions server for demos, tests and benchmarks.

Why aiohttp: its server can cancel a request handler the moment the client's connection is lost
(`handler_cancellation=True`: `connection_lost` cancels the handler task), so a streamed answer
notices a disconnect *while it waits* between tokens, not only when its next write fails. That
is the fact the tests need ("the provider saw the connection close, and when"). With
Starlette + uvicorn the same needs a task listening for `http.disconnect` next to the sender, and
two packages instead of one. A failed write (ConnectionResetError) is caught as a disconnect too.

How the official `openai` SDK closes a streamed answer when the task iterating it is cancelled
(read in openai 3.x `_streaming.py`, httpx2/httpcore2 `http11.py`): the CancelledError is raised
at the socket read inside httpcore's response byte stream, whose `except BaseException` closes
the response under a cancellation shield; as the HTTP/1.1 exchange is not complete
(h11 state not DONE), the connection is closed rather than returned to the pool, so the server
sees FIN/RST at once. `AsyncStream.__stream__`'s `finally: await response.aclose()` then runs too,
as does `await stream.close()`. The one gap: a task cancelled while it is *not* inside
`__anext__` (e.g. processing a chunk) leaves the response open until the stream is closed or
collected, so callers should iterate inside `async with stream:`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fake_llm.script import (
    ErrorTurn,
    RequestRecord,
    ScriptError,
    TextTurn,
    ToolCallsTurn,
    Turn,
    script_from_json,
    turn_to_json,
)
from fake_llm.validation import InvalidRequest, validate_request

_SAMPLE = (
    "the stop reaches the step in flight and the stream closes at once while the model was "
    "still writing its answer one token after another"
)
_WORDS = tuple(_SAMPLE.split())
_TOKEN = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class ServerConfig:
    """How the fake answers when the script does not say otherwise."""

    tokens_per_second: float = 50.0  # 0 or less: as fast as possible
    default_tokens: int = 20  # length of a generated answer
    api_key: str | None = None  # when set, `Authorization: Bearer <key>` must match
    models: tuple[str, ...] = ("fake-model",)  # listed by GET /v1/models (any model is accepted)
    # Benchmarks: each streamed text token becomes " <time.monotonic() when sent>", so a client
    # on the same host can time every token from the provider's send to its own receipt.
    stamp_tokens: bool = False


def tokenize(text: str) -> list[str]:
    """Split text into word tokens that keep their leading whitespace; they join back exactly."""
    tokens = _TOKEN.findall(text)
    tail = text[sum(map(len, tokens)) :]
    if tail and tokens:
        tokens[-1] += tail
    elif tail:
        tokens.append(tail)
    return tokens


def generated_tokens(count: int) -> list[str]:
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(count)]


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _mask(key: str) -> str:
    return key[:3] + "*" * max(len(key) - 7, 3) + key[-4:] if len(key) > 8 else "***"


class FakeLLM:
    """The server: an aiohttp app plus the script it follows and the record of what it saw.

    Run it in process (`await fake.start()` → base URL for `AsyncOpenAI(base_url=...)`, then
    `fake.requests`, `fake.set_script(...)`) or as `python -m fake_llm` and control it over HTTP:
    `GET /_fake/requests`, `DELETE /_fake/requests`, `GET`/`POST /_fake/script`. The control
    routes need no API key: bind the fake to loopback."""

    def __init__(self, config: ServerConfig | None = None, script: Sequence[Turn] = ()) -> None:
        self.config = config or ServerConfig()
        self.requests: list[RequestRecord] = []
        self._script: list[Turn] = list(script)
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.base_url = ""

    # --- control -------------------------------------------------------------------------

    def set_script(self, turns: Sequence[Turn]) -> None:
        """Replace the turns the next requests get."""
        self._script = list(turns)

    @property
    def script(self) -> list[Turn]:
        return list(self._script)

    def record(self, request_id: str) -> RequestRecord:
        return next(r for r in self.requests if r.request_id == request_id)

    def _next_turn(self) -> Turn:
        if not self._script:
            return TextTurn(tokens=self.config.default_tokens)
        turn = self._script[0]
        if isinstance(turn, ErrorTurn) and turn.times > 1:
            self._script[0] = ErrorTurn(turn.status, turn.message, turn.retry_after, turn.times - 1)
        else:
            self._script.pop(0)
        return turn

    # --- serving -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/requests", self._get_requests)
        app.router.add_delete("/_fake/requests", self._clear_requests)
        app.router.add_get("/_fake/script", self._get_script)
        app.router.add_post("/_fake/script", self._set_script)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (port 0: a free one) and return the base URL, `http://host:port/v1`."""
        # handler_cancellation: a lost connection cancels the handler at once (see module doc).
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        self._closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if self.config.api_key is None:
            return None
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            body = _error_body(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
                None,
            )
        elif header[7:].strip() != self.config.api_key:
            body = _error_body(
                f"Incorrect API key provided: {_mask(header[7:].strip())}.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
        else:
            return None
        return web.json_response(body, status=401)

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
            for m in self.config.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rec = RequestRecord(
            request_id=f"req_{uuid.uuid4().hex}",
            received_at=time.monotonic(),
            traceparent=request.headers.get("traceparent"),
        )
        self.requests.append(rec)
        headers = {"x-request-id": rec.request_id}
        denied = self._auth_error(request)
        if denied is not None:
            rec.status, rec.outcome, rec.ended_at = 401, "rejected", time.monotonic()
            denied.headers.update(headers)
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = None
            problem: InvalidRequest | None = InvalidRequest(
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly.)"
            )
        else:
            problem = None
        if isinstance(body, dict):
            rec.model = body.get("model") if isinstance(body.get("model"), str) else None
            messages = body.get("messages")
            if isinstance(messages, list):
                rec.message_count, rec.messages = len(messages), messages
        try:
            if problem is not None:
                raise problem
            model, _, stream = validate_request(body)
        except InvalidRequest as exc:
            rec.status, rec.outcome, rec.error = 400, "rejected", exc.message
            rec.ended_at = time.monotonic()
            err = _error_body(exc.message, "invalid_request_error", exc.param, exc.code)
            return web.json_response(err, status=400, headers=headers)
        assert isinstance(body, dict)
        rec.stream = stream
        turn = self._next_turn()
        rec.turn = turn.kind
        if isinstance(turn, ErrorTurn):
            return self._scripted_error(rec, turn, headers)
        answer = _Answer(self, request, rec, turn, model, body, headers)
        try:
            return await (answer.stream() if stream else answer.complete())
        except asyncio.CancelledError:
            rec.ended_at = time.monotonic()
            if rec.outcome == "pending":
                rec.outcome = "server_stopped" if self._closing else "client_closed"
                if not self._closing:
                    rec.client_closed_at = rec.ended_at
            raise

    def _scripted_error(
        self, rec: RequestRecord, turn: ErrorTurn, headers: dict[str, str]
    ) -> web.Response:
        rec.status, rec.outcome, rec.ended_at = turn.status, "error", time.monotonic()
        if turn.status == 429:
            default, type_, code = (
                "Rate limit reached (scripted).",
                "requests",
                "rate_limit_exceeded",
            )
        elif turn.status >= 500:
            default = "The server had an error while processing your request. Sorry about that!"
            type_, code = "server_error", None
        else:
            default, type_, code = "Scripted error.", "invalid_request_error", None
        message = turn.message or default
        rec.error = message
        if turn.retry_after is not None:
            headers["retry-after"] = str(max(1, round(turn.retry_after)))
            headers["retry-after-ms"] = str(round(turn.retry_after * 1000))
        body = _error_body(message, type_, None, code)
        return web.json_response(body, status=turn.status, headers=headers)

    # --- records over HTTP -----------------------------------------------------------------

    async def _get_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": [r.to_json() for r in self.requests]})

    async def _clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({"requests": []})

    async def _get_script(self, request: web.Request) -> web.Response:
        return web.json_response({"script": [turn_to_json(t) for t in self._script]})

    async def _set_script(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            turns = script_from_json(body.get("script") if isinstance(body, dict) else body)
        except (ValueError, ScriptError) as exc:
            err = _error_body(str(exc), "invalid_request_error", "script", None)
            return web.json_response(err, status=400)
        self.set_script(turns)
        return web.json_response({"script": [turn_to_json(t) for t in self._script]})


class _Answer:
    """One answer being sent: the token schedule, the chunk format, the record's counters."""

    def __init__(
        self,
        fake: FakeLLM,
        request: web.Request,
        rec: RequestRecord,
        turn: TextTurn | ToolCallsTurn,
        model: str,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> None:
        self.request, self.rec, self.turn, self.model, self.headers = (
            request,
            rec,
            turn,
            model,
            headers,
        )
        rate = turn.tokens_per_second
        self.rate = fake.config.tokens_per_second if rate is None else rate
        self.stamp = fake.config.stamp_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        options = body.get("stream_options")
        self.usage = isinstance(options, dict) and options.get("include_usage") is True
        self.prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        if isinstance(turn, TextTurn):
            self.text = (
                tokenize(turn.text)
                if turn.text is not None
                else generated_tokens(
                    fake.config.default_tokens if turn.tokens is None else turn.tokens
                )
            )
        else:
            self.text = tokenize(turn.text) if turn.text else []
        self.calls = [
            (call.id or f"call_{uuid.uuid4().hex[:24]}", call)
            for call in (turn.calls if isinstance(turn, ToolCallsTurn) else ())
        ]
        self.start = 0.0
        self.ticks = 0

    async def _tick(self) -> None:
        """Wait for the next token's slot: token i goes out at start + i/rate (no drift)."""
        if self.rate > 0:
            delay = self.start + self.ticks / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        self.ticks += 1

    def _break_due(self) -> bool:
        limit = self.turn.break_after if isinstance(self.turn, TextTurn) else None
        return limit is not None and self.rec.tokens_sent >= limit

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.usage:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def _usage(self) -> dict[str, int]:
        done = self.rec.tokens_sent
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def _finish_reason(self) -> str:
        return "tool_calls" if self.calls else "stop"

    async def stream(self) -> web.StreamResponse:
        rec = self.rec
        resp = web.StreamResponse(
            headers={
                **self.headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await resp.prepare(self.request)
        self.start = rec.response_started_at = time.monotonic()
        first: dict[str, Any] = {"role": "assistant", "content": "" if self.text else None}
        try:
            await resp.write(self._chunk({**first, "refusal": None}))
            for token in self.text:
                if self._break_due():
                    return await self._break(resp)
                await self._tick()
                if self.stamp:
                    token = f" {time.monotonic():.6f}"
                await resp.write(self._chunk({"content": token}))
                rec.tokens_sent += 1
            for index, (call_id, call) in enumerate(self.calls):
                await self._tick()
                head = {"name": call.name, "arguments": ""}
                delta = {"index": index, "id": call_id, "type": "function", "function": head}
                await resp.write(self._chunk({"tool_calls": [delta]}))
                size = self.turn.argument_chunk if isinstance(self.turn, ToolCallsTurn) else 8
                for at in range(0, len(call.arguments), size):
                    await self._tick()
                    piece = {
                        "index": index,
                        "function": {"arguments": call.arguments[at : at + size]},
                    }
                    await resp.write(self._chunk({"tool_calls": [piece]}))
                rec.tokens_sent += 1
            await resp.write(self._chunk({}, self._finish_reason()))
            if self.usage:
                final = json.loads(self._chunk({})[6:])
                final["choices"], final["usage"] = [], self._usage()
                await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            rec.ended_at = rec.client_closed_at = time.monotonic()
            rec.outcome = "client_closed"
            return resp
        rec.outcome, rec.ended_at = "completed", time.monotonic()
        return resp

    async def _break(self, resp: web.StreamResponse) -> web.StreamResponse:
        rec = self.rec
        rec.outcome, rec.ended_at = "broken", time.monotonic()
        assert isinstance(self.turn, TextTurn)
        if self.turn.break_mode == "error_event":
            err = _error_body("The stream broke (scripted).", "server_error", None, None)
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
            await resp.write_eof()
        elif self.request.transport is not None:
            self.request.transport.abort()
        return resp

    async def complete(self) -> web.StreamResponse:
        """A non-streamed answer, sent after the time its tokens would have taken."""
        rec = self.rec
        self.start = rec.response_started_at = time.monotonic()
        for _ in self.text:
            if self._break_due():
                rec.outcome, rec.ended_at = "broken", time.monotonic()
                if self.request.transport is not None:
                    self.request.transport.abort()
                return web.Response(status=500)
            await self._tick()
            rec.tokens_sent += 1
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) if self.text or not self.calls else None,
            "refusal": None,
        }
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for call_id, c in self.calls
            ]
            rec.tokens_sent += len(self.calls)
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self._finish_reason(),
                }
            ],
            "usage": self._usage(),
        }
        rec.outcome, rec.ended_at = "completed", time.monotonic()
        return web.json_response(body, headers=self.headers)
