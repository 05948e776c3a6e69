"""Following one operation's stream to the terminal, with the command line's Ctrl-C contract
(see Follower): what `stopline run` and `stopline attach` show, and the exit status they end
with.

It uses grpc.aio because Ctrl-C has to send a stop while the stream keeps running: the events
that follow the stop (the gateway's acknowledgement, then the terminal event with the halt time)
are the whole point of pressing it, so the stream must not be torn down by the signal.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import grpc
from grpc import aio

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import (
    EXIT_BY_TERMINAL_EVENT,
    EXIT_INTERRUPTED,
    EventLines,
    describe_event,
    status_name,
    to_json,
)
from stopline.v1 import operation_pb2 as op_pb
from stopline_cli.connection import UNARY_TIMEOUT, from_rpc_error, gateway_error

STOP_REASON = "Ctrl-C in the stopline command"
NOTICE_PREFIX = "[   ·] "  # lines the gateway adds that are not durable events (no seq)

Update = pb.StartAndStreamResponse | pb.StreamOperationResponse
UpdateCall = aio.UnaryStreamCall[Any, Any]


def describe_update(update: Update) -> str:
    """One readable line per stream message; the gateway's own notices carry no seq."""
    if isinstance(update, pb.StartAndStreamResponse) and update.HasField("accepted"):
        return f"operation {update.accepted.operation_id}"
    if update.HasField("event"):
        return describe_event(update.event)
    if update.HasField("stop_requested"):
        return NOTICE_PREFIX + "stop acknowledged by the gateway"
    if update.HasField("stop_undelivered"):
        return NOTICE_PREFIX + f"stop NOT delivered: {update.stop_undelivered.reason}"
    return NOTICE_PREFIX + "(unknown message)"


class Follower:
    """Streams one operation to the terminal with the command line's Ctrl-C contract.

    The first Ctrl-C says "stopping…" at once and sends StopOperation, but keeps reading: the stop
    is only done when the terminal event arrives, and that event is what reports the halt time. If
    the operation id is not known yet (the start is in flight) the stop waits for it rather than
    being dropped; with the start's idempotency key (which `run` always sends) it is sent at once,
    by that key, so it lands before any step however the start and the stop interleave. A second
    Ctrl-C abandons the stream without waiting for anything.
    """

    def __init__(
        self,
        stub: pb_grpc.GatewayServiceAsyncStub,
        as_json: bool,
        operation_id: str | None = None,
        after_seq: int = 0,
        detach: bool = False,
        idempotency_key: str = "",
    ) -> None:
        self._stub = stub
        self._key = idempotency_key
        self._as_json = as_json
        self._detach = detach
        self._operation_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if operation_id is not None:
            self._operation_id.set_result(operation_id)
        self.last_seq = after_seq
        self._ctrl_c_at: float | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[int] | None = None
        self._left = False
        self._lines = EventLines(self._write)
        self._context: contextvars.Context | None = None
        # The prompt that answers input requests (stopline_cli/waiting.py) is told of every
        # event before it is shown, and of all output before it is written.
        self.on_event: Callable[[op_pb.Event], None] | None = None
        self.before_output: Callable[[], None] | None = None

    def _write(self, text: str) -> None:
        if self.before_output is not None:
            self.before_output()
        click.echo(text, nl=False)

    def operation_id(self) -> str:
        return self._id()

    def say(self, text: str) -> None:
        self._say(text)

    def _say(self, text: str) -> None:
        """Remarks for people; with --json they go to stderr so stdout stays parseable."""
        if self._as_json:
            click.echo(text, err=True)
        else:
            self._lines.line(text)

    @contextmanager
    def ctrl_c_handled(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.on_ctrl_c)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    def on_ctrl_c(self) -> None:
        if self._ctrl_c_at is None:
            self._ctrl_c_at = time.monotonic()
            self._say("stopping…")
            # In the stream's context (its span), wherever the signal handler runs.
            context = self._context.copy() if self._context is not None else None
            self._stopper = asyncio.create_task(self._stop(), context=context)
            return
        self._left = True
        if self._reader is not None:
            self._reader.cancel()

    async def _stop(self) -> None:
        if self._key and not self._operation_id.done():
            # The id is not known yet: stop by the start's key (recorded ahead of the start if
            # the start has not reached the runtime), so no timing is involved.
            request = pb.StopOperationRequest(idempotency_key=self._key, reason=STOP_REASON)
        else:
            request = pb.StopOperationRequest(
                operation_id=await self._operation_id, reason=STOP_REASON
            )
        try:
            response = await self._stub.StopOperation(request, timeout=UNARY_TIMEOUT)
        except aio.AioRpcError as exc:
            click.echo(f"stop failed: {exc.code().name}: {exc.details()}", err=True)
            return
        if response.delivery == pb.STOP_DELIVERY_PENDING:
            self._say("stop accepted; still being delivered to the runtime")

    async def follow(self, open_call: Callable[[], UpdateCall]) -> int:
        """Stream until the terminal event; returns the exit status."""
        self._context = contextvars.copy_context()
        call = open_call()
        self._reader = asyncio.create_task(self._read(call))
        try:
            return await self._reader
        except asyncio.CancelledError:
            if not self._left:
                raise
            self._say(f"left without waiting; see how it ends with: stopline show {self._id()}")
            return EXIT_INTERRUPTED
        finally:
            if not self._as_json:
                self._lines.end_line()
            call.cancel()
            if self._stopper is not None and not self._stopper.done():
                self._stopper.cancel()

    def _id(self) -> str:
        return self._operation_id.result() if self._operation_id.done() else "ID"

    def _resume_hint(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> str:
        """Only a broken or idle-ended stream is worth resuming; other errors would repeat.
        One whose events expired (retention) can still be shown."""
        if code is grpc.StatusCode.FAILED_PRECONDITION and self._operation_id.done():
            return f"; see how it ended with: stopline show {self._id()}"
        resumable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        if code not in resumable or not self._operation_id.done():
            return ""
        return f"; resume with: stopline attach {self._id()} --after {self.last_seq}"

    async def _read(self, call: UpdateCall) -> int:
        try:
            async for update in call:
                if update.HasField("event") and self.on_event is not None:
                    self.on_event(update.event)  # before it is shown (it may end a prompt's line)
                if not self._as_json and update.HasField("event"):
                    self._lines.event(update.event)  # a model's text deltas on one line
                elif self._as_json:
                    click.echo(self._render(update))
                else:
                    self._lines.line(self._render(update))
                if isinstance(update, pb.StartAndStreamResponse) and update.HasField("accepted"):
                    self._operation_id.set_result(update.accepted.operation_id)
                    if self._detach:
                        return await self._detached(call)
                elif update.HasField("event"):
                    event = update.event
                    self.last_seq = event.seq
                    kind = event.WhichOneof("kind")
                    if kind in EXIT_BY_TERMINAL_EVENT:
                        self._report_end(event)
                        return EXIT_BY_TERMINAL_EVENT[kind]
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._resume_hint(exc.code())) from exc
        ended = await self._ended_before_the_stream()
        if ended is not None:
            return ended
        raise gateway_error(
            grpc.StatusCode.UNAVAILABLE,
            "the gateway ended the stream before the operation ended" + self._resume_hint(),
        )

    async def _ended_before_the_stream(self) -> int | None:
        """A stream that ends cleanly without a terminal event: the operation had ended at or
        before --after (nothing to show), or the stream was cut short. Asks the operation which;
        returns the exit status in the first case."""
        if not self._operation_id.done():
            return None
        request = pb.GetOperationRequest(operation_id=self._id())
        try:
            response = await self._stub.GetOperation(request, timeout=UNARY_TIMEOUT)
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._resume_hint(exc.code())) from exc
        operation = response.operation
        status = status_name(operation.status)
        exit_code = EXIT_BY_TERMINAL_EVENT.get(status.lower())
        if exit_code is None or operation.last_seq > self.last_seq:
            return None
        self._say(f"operation {self._id()} {status}; no events after seq {self.last_seq}")
        return exit_code

    def _render(self, update: Update) -> str:
        if self._as_json:
            return to_json(update)
        if (
            self._detach
            and isinstance(update, pb.StartAndStreamResponse)
            and update.HasField("accepted")
        ):
            # The bare id, so that `ID=$(stopline run ... --detach)` works.
            return update.accepted.operation_id
        return describe_update(update)

    async def _detached(self, call: UpdateCall) -> int:
        """Leave the stream (the start's policy keeps the operation running), unless Ctrl-C came
        during the start: then that stop is delivered first, since it is why the user pressed it."""
        call.cancel()
        if self._stopper is None:
            return 0
        await self._stopper
        return EXIT_INTERRUPTED

    def _report_end(self, event: op_pb.Event) -> None:
        status = event.WhichOneof("kind")
        line = f"operation {self._id()} {str(status).upper()}"
        if event.HasField("interrupted"):
            line += (
                f": halted {event.interrupted.halt_ms:.1f} ms after the runtime recorded the stop"
            )
        if self._ctrl_c_at is not None:
            waited_ms = (time.monotonic() - self._ctrl_c_at) * 1000
            line += f"; {waited_ms:.0f} ms from Ctrl-C to the final event"
        self._say(line)
