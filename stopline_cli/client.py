"""Client commands of `stopline`, all through the gateway: run, attach, stop, ls, show.

They use grpc.aio because Ctrl-C has to send a stop while the stream keeps running: the events
that follow the stop (the gateway's acknowledgement, then the terminal event with the halt time)
are the whole point of pressing it, so the stream must not be torn down by the signal.

Exit status says how the operation ended: 0 COMPLETED, 1 FAILED, 130 INTERRUPTED (or left with a
second Ctrl-C); errors from the gateway exit 1, or 69 (EX_UNAVAILABLE) when a retry could fix them.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import grpc
from google.protobuf import duration_pb2
from grpc import aio

from stopline import tracing
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import (
    EXIT_BY_TERMINAL_EVENT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    LIST_LIMIT,
    STATUS_FILTERS,
    EventLines,
    describe_event,
    describe_operation,
    status_name,
    status_value,
    to_json,
)
from stopline.transport import (
    DEFAULT_GATEWAY_ADDRESS,
    GATEWAY_ADDRESS_ENV,
    TOKEN_ENV,
    ClientTLS,
    open_channel,
)
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE: the same command may work later
UNARY_TIMEOUT = 10.0
STOP_REASON = "Ctrl-C in the stopline command"
CLIENT_SERVICE_NAME = "stopline-cli"
"""The command's service.name in traces (OTEL_SERVICE_NAME overrides it)."""
NOTICE_PREFIX = "[   ·] "  # lines the gateway adds that are not durable events (no seq)

# A stream can sit silent for a whole long step; keepalive notices a dead path meanwhile. The
# servers accept pings this frequent (stopline.serving.server_options).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]

POLICIES = {
    "stop": pb.CANCEL_POLICY_STOP,
    "keep": pb.CANCEL_POLICY_KEEP_RUNNING,
    "grace": pb.CANCEL_POLICY_STOP_AFTER_GRACE,
}

Update = pb.StartAndStreamResponse | pb.StreamOperationResponse
UpdateCall = aio.UnaryStreamCall[Any, Any]


class GatewayError(click.ClickException):
    """A gRPC error shown as "<CODE>: <details>" on stderr."""

    exit_code = EXIT_FAILED

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class GatewayUnavailable(GatewayError):
    """UNAVAILABLE gets its own exit status: a script may simply try again later."""

    exit_code = EXIT_UNAVAILABLE


def gateway_error(code: grpc.StatusCode, details: str) -> GatewayError:
    if code is grpc.StatusCode.UNAVAILABLE:
        return GatewayUnavailable(code, details)
    return GatewayError(code, details)


def from_rpc_error(exc: aio.AioRpcError, hint: str = "") -> GatewayError:
    return gateway_error(exc.code(), (exc.details() or "") + hint)


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


@dataclass(frozen=True)
class Target:
    """Which gateway to call and how: its address, the caller's token, TLS trust."""

    address: str
    token: str | None = None
    tls_ca: str | None = None


def connect(target: Target | str) -> aio.Channel:
    """A channel to the gateway; with tracing on, every call carries the caller's trace
    context (open it inside `command_span` for the command's span to be the parent)."""
    if isinstance(target, str):
        target = Target(target)
    tls = ClientTLS(ca_file=target.tls_ca) if target.tls_ca else None
    return open_channel(
        target.address, target.token, tls, CHANNEL_OPTIONS, tracing.client_interceptors()
    )


@contextmanager
def command_span(name: str, **attributes: str) -> Iterator[None]:
    """The command's span, the root of its trace: the gateway's and the runtime's spans of the
    calls made inside it are its children. Tracing is switched on by the same OTEL_* variables as
    the services' (nothing is set up or sent when they are unset), and what was recorded is
    exported before the command exits."""
    configured = False
    if not tracing.enabled():
        try:
            configured = tracing.configure_from_env(CLIENT_SERVICE_NAME)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    try:
        with tracing.tracer().start_as_current_span(
            name, attributes={f"stopline.{key}": value for key, value in attributes.items()}
        ):
            yield
    finally:
        if configured:
            tracing.uninstall()


def _stub(channel: aio.Channel) -> pb_grpc.GatewayServiceAsyncStub:
    return pb_grpc.GatewayServiceStub(channel)


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


# --------------------------------------------------------------------------- commands


def _target(address: str, token: str | None, tls_ca: str | None) -> Target:
    return Target(address, token or None, tls_ca)


def _gateway_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--gateway, --token and --tls-ca; the command receives them as one `target`."""

    def build(**kwargs: Any) -> Any:
        target = _target(kwargs.pop("address"), kwargs.pop("token"), kwargs.pop("tls_ca"))
        return fn(target=target, **kwargs)

    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    # Options declared below this decorator were attached to `fn`; click collects them here.
    build.__click_params__ = list(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
    build = click.option(
        "--tls-ca",
        envvar="STOPLINE_TLS_CA",
        type=click.Path(exists=True, dir_okay=False),
        help="The gateway serves TLS: trust this CA.",
    )(build)
    build = click.option(
        "--token",
        envvar=TOKEN_ENV,
        help=f"Your API key or JWT for the gateway (or set {TOKEN_ENV}).",
    )(build)
    return click.option(
        "--gateway",
        "address",
        envvar=GATEWAY_ADDRESS_ENV,
        default=DEFAULT_GATEWAY_ADDRESS,
        show_default=True,
        help="Gateway address.",
    )(build)


_json_flag = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output, one JSON object per line."
)


def _parse_input(input_json: str) -> dict[str, Any]:
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    return value


def _start_request(
    agent: str,
    input_value: dict[str, Any],
    idempotency_key: str,
    on_cancel: str | None,
    grace: float | None,
    detach: bool,
    deadline: float | None = None,
    max_steps: int | None = None,
    no_hold: bool = False,
) -> pb.StartAndStreamRequest:
    if grace is not None and on_cancel != "grace":
        raise click.UsageError("--grace only applies with --on-cancel grace")
    if detach and on_cancel == "stop":
        # Detaching cancels the stream, which under this policy would stop the operation at once.
        raise click.UsageError(
            "--detach keeps the operation running; it cannot use --on-cancel stop"
        )
    policy = POLICIES[on_cancel or ("keep" if detach else "stop")]
    request = pb.StartAndStreamRequest(
        agent=agent, idempotency_key=idempotency_key, cancel_policy=policy, no_hold=no_hold
    )
    request.input.update(input_value)
    if grace is not None:
        request.cancel_grace.CopyFrom(_duration(grace))
    if deadline is not None:
        request.deadline.CopyFrom(_duration(deadline))
    if max_steps is not None:
        request.max_steps = max_steps
    return request


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


@click.command()
@_gateway_option
@_json_flag
@click.argument("agent")
@click.option("--input", "input_json", default="{}", help="Agent input as a JSON object.")
@click.option("--idempotency-key", default="", help="Same key, same operation (no second start).")
@click.option(
    "--on-cancel",
    type=click.Choice(list(POLICIES)),
    default=None,
    help="What the operation does if this client goes away: stop it (default; keep with "
    "--detach), keep it running, or stop it after --grace unless someone attaches.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds for --on-cancel grace (the gateway's default when omitted).",
)
@click.option("--detach", is_flag=True, help="Start, print the id, and leave it running.")
@click.option(
    "--deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds of wall time after which the runtime stops the operation (the runtime's "
    "default when omitted).",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="The most steps the operation may run (the runtime's default when omitted).",
)
@click.option(
    "--no-hold",
    is_flag=True,
    help="Start it at once, not held: the first step begins sooner, but a Ctrl-C while the "
    "start is in flight may cut that step mid-step instead of preventing it.",
)
def run(
    target: Target,
    as_json: bool,
    agent: str,
    input_json: str,
    idempotency_key: str,
    on_cancel: str | None,
    grace: float | None,
    detach: bool,
    deadline: float | None,
    max_steps: int | None,
    no_hold: bool,
) -> None:
    """Start an operation of AGENT and stream it; Ctrl-C stops it (twice: leave at once)."""
    # Always a key: a Ctrl-C during the start stops by it (see Follower).
    key = idempotency_key or f"cli-{uuid.uuid4()}"
    request = _start_request(
        agent,
        _parse_input(input_json),
        key,
        on_cancel,
        grace,
        detach,
        deadline,
        max_steps,
        no_hold=no_hold,
    )

    async def session() -> int:
        with command_span("stopline run", agent=agent):
            async with connect(target) as channel:
                stub = _stub(channel)
                follower = Follower(stub, as_json, detach=detach, idempotency_key=key)
                _prompt_for_input(follower, stub, as_json)
                with follower.ctrl_c_handled():
                    return await follower.follow(lambda: stub.StartAndStream(request))

    sys.exit(asyncio.run(session()))


@click.command()
@_gateway_option
@_json_flag
@click.argument("operation_id")
@click.option(
    "--after",
    "after_seq",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="The last seq already seen: stream only later events.",
)
def attach(target: Target, as_json: bool, operation_id: str, after_seq: int) -> None:
    """Stream an existing operation from --after until it ends; Ctrl-C stops it."""

    async def session() -> int:
        with command_span("stopline attach", operation_id=operation_id):
            async with connect(target) as channel:
                stub = _stub(channel)
                follower = Follower(stub, as_json, operation_id=operation_id, after_seq=after_seq)
                request = pb.StreamOperationRequest(operation_id=operation_id, after_seq=after_seq)
                _prompt_for_input(follower, stub, as_json)
                with follower.ctrl_c_handled():
                    return await follower.follow(lambda: stub.StreamOperation(request))

    sys.exit(asyncio.run(session()))


def _prompt_for_input(
    follower: Follower, stub: pb_grpc.GatewayServiceAsyncStub, as_json: bool
) -> None:
    """At a terminal, ask the person to answer the input requests the stream shows."""
    from stopline_cli.waiting import Prompter  # (it builds on this module's helpers)

    if Prompter.wanted(as_json):
        prompter = Prompter(stub, follower.operation_id, follower.say)
        follower.on_event = prompter.on_event
        follower.before_output = prompter.before_output


async def _unary(
    target: Target, call: Callable[[pb_grpc.GatewayServiceAsyncStub], Any], name: str
) -> Any:
    with command_span(name):
        async with connect(target) as channel:
            try:
                return await call(_stub(channel))
            except aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc


@click.command()
@_gateway_option
@_json_flag
@click.argument("operation_id", required=False, default="")
@click.option(
    "--key",
    default="",
    help="Stop the operation started with this idempotency key instead of by id; works before "
    "the start is answered, or sent (the stop is then recorded ahead of it).",
)
@click.option("--reason", default="stopped from the command line", show_default=True)
def stop(target: Target, as_json: bool, operation_id: str, key: str, reason: str) -> None:
    """Stop an operation (OPERATION_ID or --key); answers without waiting for the step in
    flight."""
    if bool(operation_id) == bool(key):
        raise click.UsageError("give exactly one of OPERATION_ID and --key")
    request = pb.StopOperationRequest(operation_id=operation_id, idempotency_key=key, reason=reason)
    response: pb.StopOperationResponse = asyncio.run(
        _unary(
            target, lambda stub: stub.StopOperation(request, timeout=UNARY_TIMEOUT), "stopline stop"
        )
    )
    if as_json:
        click.echo(to_json(response))
    elif response.delivery == pb.STOP_DELIVERY_PENDING:
        click.echo("stop accepted; still being delivered to the runtime")
    elif response.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD:
        click.echo("stop recorded ahead: a start with this key will not run a step")
    else:
        outcome = rt_pb.InterruptOutcome.Name(response.outcome).removeprefix("INTERRUPT_OUTCOME_")
        if response.HasField("operation"):
            click.echo(f"stop delivered: {outcome} ({status_name(response.operation.status)})")
        else:  # stopped by key before the start: nothing to show but the tombstone
            click.echo(f"stop delivered: {outcome} (no operation with this key yet)")


@click.command("ls")
@_gateway_option
@_json_flag
@click.option("--status", type=click.Choice(STATUS_FILTERS), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=LIST_LIMIT, show_default=True)
def list_operations(target: Target, as_json: bool, status: str | None, limit: int) -> None:
    """List operations, newest first."""
    request = pb.ListOperationsRequest(status=status_value(status or ""), page_size=limit)
    response: pb.ListOperationsResponse = asyncio.run(
        _unary(
            target, lambda stub: stub.ListOperations(request, timeout=UNARY_TIMEOUT), "stopline ls"
        )
    )
    for operation in response.operations:
        click.echo(to_json(operation) if as_json else describe_operation(operation))


@click.command()
@_gateway_option
@_json_flag
@click.argument("operation_id")
def show(target: Target, as_json: bool, operation_id: str) -> None:
    """Show one operation."""
    request = pb.GetOperationRequest(operation_id=operation_id)
    response: pb.GetOperationResponse = asyncio.run(
        _unary(
            target, lambda stub: stub.GetOperation(request, timeout=UNARY_TIMEOUT), "stopline show"
        )
    )
    operation = response.operation
    click.echo(to_json(operation) if as_json else describe_operation(operation))


COMMANDS: list[click.Command] = [run, attach, stop, list_operations, show]
