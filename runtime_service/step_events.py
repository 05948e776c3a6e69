"""The events of one step in flight: output, coalesced token deltas, agent events and tool calls,
written through the runner (runtime_service.runner) as the StepContext's StepEvents.

Deltas. `delta(text)` appends to a buffer that is written as one `text_delta` event after
`flush_seconds` or once it holds `flush_chars` characters, and before any other event of the
step, so the event order is the order the agent acted in. Once the runner learns of a stop (the
stop "reaches the step"), delta() refuses like emit(), and the runner flushes what is buffered
before it halts: every delta passed before the stop reached the step is stored. Those writes are
allowed after the stop_requested event (like settlement records, before the terminal event), so
a `text_delta` may follow `stop_requested`; it only ever holds text passed before the runner knew.

Tool calls. Each started call has an entry in `_calls` from before its `tool_call_started` write
is sent until the one write that ends it is launched; whoever removes the entry (the call's own
exit, or `close()` for calls still open when the step ends) writes the ending, so there is
exactly one. The entry is removed synchronously, and the ending is written by a task of its own
that close() waits for, so a second cancellation cannot lose it and every ending lands before the
runner's halt. A runner that dies mid-call leaves the call open in the log; whoever takes the
operation over settles it as outcome unknown (storage.shared) before the step runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from runtime_service.agents.base import ToolCall, ToolOutcome, ToolSpec
from runtime_service.config import DEFAULT_DELTA_FLUSH_CHARS, DEFAULT_DELTA_FLUSH_SECONDS
from runtime_service.domain import EventKind, JSONValue
from runtime_service.storage import Appended, Storage
from runtime_service.tools.toolbox import ToolBox, ToolFailed, parse_arguments
from stopline import tracing
from stopline.json_values import json_problem, shown, storable_text

log = logging.getLogger(__name__)

Landed = Callable[[asyncio.Future[Appended | None]], None]
WriteSoon = Callable[
    [Callable[[], asyncio.Future[Appended | None]], Landed], asyncio.Future[Appended | None]
]

STOPPED_REASON = "the operation was stopped"
NOT_STOPPED_REASON = "the runtime stopped running the step (shutdown or lost ownership)"
NO_RESULT = "the tool call ended without a result"
OUTCOME = "stopline.tool_call.outcome"
"""The span attribute of a tool call's ending: finished, failed or cancelled."""
OPEN_AT_END = "the step ended before the tool call did"


class OperationHalted(Exception):
    """Raised inside an agent that emits output once a stop is recorded (nothing more is stored:
    no output follows the stop_requested event), or after its operation ended or moved."""


@dataclass(frozen=True)
class DeltaSettings:
    flush_seconds: float = DEFAULT_DELTA_FLUSH_SECONDS
    flush_chars: int = DEFAULT_DELTA_FLUSH_CHARS


@dataclass(eq=False)
class _OpenCall:
    call_id: str
    started: asyncio.Future[Appended | None]


@dataclass(eq=False)
class StepEvents:
    operation_id: str
    step: int
    runner_id: str
    storage: Storage
    # The runner's write of an event made or queued now (Storage.append_soon): publishes
    # its events once committed, then calls the Landed callback.
    write_soon: WriteSoon
    stopped: Callable[[], bool]  # whether the stop has reached the step
    on_stop: Callable[[], None]  # a write found a stop recorded: tell the runner
    deltas: DeltaSettings
    tools: ToolBox
    # False: the stop-at-boundary mode, where the step runs to its end and keeps its output.
    abort_mid_step: bool = True
    # Told how many delta() calls each text_delta event coalesced (the runtime's metrics).
    on_flush: Callable[[int], None] | None = None
    _buffer: list[str] = field(default_factory=list)
    _buffered: int = 0
    _timer: asyncio.Task[None] | None = None
    _flushing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _calls: dict[str, _OpenCall] = field(default_factory=dict)
    _used_ids: set[str] = field(default_factory=set)
    _writes: set[asyncio.Future[Any]] = field(default_factory=set)
    _closed: bool = False

    # ------------------------------------------------------------------ writing

    def _launch(
        self,
        kind: EventKind,
        data: dict[str, JSONValue],
        outlives_stop: bool,
        waiter: asyncio.Future[None] | None = None,
    ) -> asyncio.Future[Appended | None]:
        """Write an event: made or queued before this returns, so it lands (and is published)
        even if the agent is cancelled while awaiting it; close() waits for it. No task of its
        own: with one per event (its creation, its two turns, the shield's wake-up) the event
        loop spent more on an output chunk than the database did. Once it lands, one callback
        publishes it, notes a stop it found, and wakes `waiter` (whoever awaits the write)."""
        start = partial(
            self.storage.append_soon, self.operation_id, kind, data, self.runner_id, outlives_stop
        )
        future = self.write_soon(start, partial(self._landed, waiter))
        if not future.done():
            self._writes.add(future)  # _landed, called later, takes it out
        return future

    def _landed(
        self, waiter: asyncio.Future[None] | None, written: asyncio.Future[Appended | None]
    ) -> None:
        self._written(written)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.abort_mid_step or written.cancelled() or written.exception() is not None:
            return
        appended = written.result()
        if appended is not None and appended.stopping:
            self.on_stop()  # the write found a stop recorded: tell the runner

    async def _landing(
        self, kind: EventKind, data: dict[str, JSONValue], outlives_stop: bool
    ) -> Appended | None:
        """`_launch` the event and wait until it has landed: a cancelled caller stops waiting,
        the write goes on (what asyncio.shield does, with one future and callback fewer)."""
        waiter = asyncio.get_running_loop().create_future()
        written = self._launch(kind, data, outlives_stop, waiter)
        if not written.done():
            await waiter
        return written.result()

    def _track(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._writes.add(future)
        future.add_done_callback(self._written)
        return future

    def _written(self, future: asyncio.Future[Any]) -> None:
        """A write of the step landed: off the list close() waits on, and a failure logged."""
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # The caller that awaited it (if any) got the error too; a timer's flush has none.
            # A storage failure fails the runner's next write as well, which leaves the
            # operation to be resumed (see runner/core.py, Runner._run).
            log.warning("operation %s: a write failed: %s", self.operation_id, future.exception())

    def _check_open(self) -> None:
        if self._closed or (self.abort_mid_step and self.stopped()):
            raise OperationHalted(f"operation {self.operation_id} is being stopped or has ended")

    async def _output(self, kind: EventKind, data: dict[str, JSONValue]) -> None:
        """An event under the output rule: refused once a stop is recorded (the refusal tells
        the runner of the stop, if nothing else has yet)."""
        self._check_open()
        if self._buffer:
            await self.flush()
        appended = await self._landing(kind, data, not self.abort_mid_step)
        if appended is None:
            if self.abort_mid_step:
                self.on_stop()
            raise OperationHalted(f"operation {self.operation_id} has ended or is being stopped")

    async def emit(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"emit() takes a str, got {type(text).__name__}")
        await self._output(EventKind.OUTPUT_CHUNK, {"step": self.step, "text": text})

    async def event(self, kind: str, payload: JSONValue) -> None:
        if not isinstance(kind, str) or not kind:
            raise TypeError("event() takes a non-empty str kind")
        _require_json(payload, "the event payload")
        data: dict[str, JSONValue] = {"step": self.step, "kind": kind, "payload": payload}
        await self._output(EventKind.AGENT_EVENT, data)

    # ------------------------------------------------------------------ deltas

    async def delta(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"delta() takes a str, got {type(text).__name__}")
        self._check_open()
        if not text:
            return
        self._buffer.append(text)
        self._buffered += len(text)
        if self._buffered >= self.deltas.flush_chars:
            await self.flush()
        elif self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.deltas.flush_seconds)
        await self.flush()

    async def flush(self) -> None:
        """Write the buffered deltas as one event (in a task of its own, holding the flush lock,
        so flushes land in order and a cancelled caller does not lose the text)."""
        if self._buffer:
            await asyncio.shield(asyncio.ensure_future(self._flush_now()))

    async def _flush_now(self) -> None:
        async with self._flushing:
            if not self._buffer:
                return
            text = "".join(self._buffer)
            if self.on_flush is not None:
                self.on_flush(len(self._buffer))
            self._buffer.clear()
            self._buffered = 0
            data: dict[str, JSONValue] = {"step": self.step, "text": text}
            await self._launch(EventKind.TEXT_DELTA, data, True)

    # ------------------------------------------------------------------ tool calls

    @contextlib.asynccontextmanager
    async def tool_call(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> AsyncIterator[ToolCall]:
        if call_id is None:
            call_id = f"call_{uuid.uuid4().hex[:16]}"
        if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
            raise TypeError("tool_call() takes a non-empty str name and call_id")
        if call_id in self._used_ids:
            raise ValueError(f"tool call id {shown(call_id)} was already used in this step")
        _require_json(arguments, "the tool call's arguments")
        self._check_open()
        await self.flush()
        self._check_open()
        self._used_ids.add(call_id)
        data: dict[str, JSONValue] = {
            "step": self.step,
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        }
        entry = _OpenCall(
            call_id, self._launch(EventKind.TOOL_CALL_STARTED, data, not self.abort_mid_step)
        )
        self._calls[call_id] = entry  # from here on, close() settles it if nothing else does
        if await asyncio.shield(entry.started) is None:
            self._calls.pop(call_id, None)  # never started: nothing to settle
            if self.abort_mid_step:
                self.on_stop()
            raise OperationHalted(f"operation {self.operation_id} has ended or is being stopped")
        call = ToolCall(call_id, name, arguments)
        # A child of the step's span (current in the step's task); the tool's name and the
        # call's id only: arguments and results may hold anything.
        with tracing.tracer().start_as_current_span(
            f"execute_tool {name}",
            attributes={"gen_ai.tool.name": name, "gen_ai.tool.call.id": call_id},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield call
            except asyncio.CancelledError:
                reason = STOPPED_REASON if self.stopped() else NOT_STOPPED_REASON
                span.set_attribute(OUTCOME, "cancelled")
                await self._settle(call_id, EventKind.TOOL_CALL_CANCELLED, {"reason": reason})
                raise
            except BaseException as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                span.set_attribute(OUTCOME, "failed")
                await self._settle(call_id, EventKind.TOOL_CALL_FAILED, {"error": error})
                raise
            if call.ended and call.error is None:
                span.set_attribute(OUTCOME, "finished")
                await self._settle(call_id, EventKind.TOOL_CALL_FINISHED, {"result": call.result})
            else:
                error = call.error if call.ended and call.error is not None else NO_RESULT
                span.set_attribute(OUTCOME, "failed")
                await self._settle(call_id, EventKind.TOOL_CALL_FAILED, {"error": error})

    async def _settle(self, call_id: str, kind: EventKind, fields: dict[str, JSONValue]) -> None:
        """The one ending of a call, unless close() wrote it already. Allowed after a stop."""
        if self._calls.pop(call_id, None) is None:
            return
        problem = json_problem(fields["result"]) if kind is EventKind.TOOL_CALL_FINISHED else None
        if problem is not None:
            kind = EventKind.TOOL_CALL_FAILED
            fields = {"error": f"the result is not JSON: {problem}"}
        error = fields.get("error")
        if isinstance(error, str):  # an exception's text: stored whatever it holds
            fields = {**fields, "error": storable_text(error)}
        data: dict[str, JSONValue] = {"step": self.step, "call_id": call_id, **fields}
        await asyncio.shield(self._track(asyncio.ensure_future(self._flush_then(kind, data))))

    async def _flush_then(self, kind: EventKind, data: dict[str, JSONValue]) -> None:
        await self._flush_now()
        await self._launch(kind, data, True)

    async def call_tool(
        self, name: str, arguments: JSONValue, call_id: str | None = None
    ) -> ToolOutcome:
        tool = self.tools.get(name)
        async with self.tool_call(name, arguments, call_id) as call:
            try:
                if tool is None:
                    raise ToolFailed(f"no tool named {shown(name)} is registered")
                parsed = parse_arguments(arguments)
                self.tools.check(name, tool, parsed)
                call.finish(await self.tools.run(tool, parsed, self._progress))
            except (ToolFailed, OperationHalted) as exc:
                call.fail(str(exc))
            except Exception as exc:  # the tool's own failure: the model is told, the step goes on
                call.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if call.error is not None:
            return ToolOutcome(call.call_id, ok=False, error=call.error)
        return ToolOutcome(call.call_id, ok=True, result=call.result)

    async def _progress(self, text: str) -> None:
        """A tool's progress output; once the stop reached the step it is dropped (the stop is
        handled by cancelling the call, not by failing it)."""
        with contextlib.suppress(OperationHalted):
            await self.emit(text)

    def tool_specs(self, names: Sequence[str] | None = None) -> list[ToolSpec]:
        return self.tools.specs(names)

    # ------------------------------------------------------------------ the end of the step

    async def close(self, stopping: bool) -> None:
        """The step has ended (returned, raised, or was cut): refuse anything more, write the
        buffered deltas, settle every call still open (cancelled by the stop, or failed) and
        wait until every write of the step has landed, so all of it precedes the boundary or
        the halt the runner writes next."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()  # a flush it began goes on (shielded) and is awaited below
        await self.flush()
        for call_id, entry in list(self._calls.items()):
            if not entry.started.done():
                await asyncio.wait({entry.started})
            started = entry.started
            if started.cancelled() or started.exception() is not None or not started.result():
                self._calls.pop(call_id, None)  # never recorded started (or unknown: see above)
                continue
            if stopping:
                reason: dict[str, JSONValue] = {"reason": STOPPED_REASON}
                await self._settle(call_id, EventKind.TOOL_CALL_CANCELLED, reason)
            else:
                await self._settle(call_id, EventKind.TOOL_CALL_FAILED, {"error": OPEN_AT_END})
        while self._writes:
            await asyncio.wait(set(self._writes))


def _require_json(value: JSONValue, what: str) -> None:
    problem = json_problem(value)
    if problem is not None:
        raise TypeError(f"{what} must be JSON-serialisable: {problem}")
