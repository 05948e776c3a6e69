"""Waiting for a person on the command line: `stopline answer`, `pause` and `resume` for scripts,
and the prompt `run` and `attach` show when an operation asks and stdin is a terminal.

The prompt reads the terminal on a daemon thread, so the stream (and Ctrl-C, which stops the
operation as always) keeps going while it waits for a person. It asks only about a request that
is still open when it arrives (a replayed one that was answered long ago is just shown), and is
dropped if the request is resolved meanwhile (answered elsewhere, expired, or stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import click
from grpc import aio

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import describe_answer, json_flag, status_name, to_json
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline_cli.connection import UNARY_TIMEOUT, Target, gateway_option, unary_call


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=what) from exc


def build_answer(
    approve: bool, reject: str | None, arguments: str | None, value: str | None
) -> op_pb.InputAnswer:
    """The answer the options ask for: exactly one of --approve, --reject, --args, --value."""
    if sum((approve, reject is not None, arguments is not None, value is not None)) != 1:
        raise click.UsageError("give exactly one of --approve, --reject, --args and --value")
    answer = op_pb.InputAnswer()
    if value is not None:
        answer.value.CopyFrom(_to_value(_json_arg(value, "--value")))
    elif reject is not None:
        answer.approval.CopyFrom(op_pb.Approval(approved=False, reason=reject))
    else:
        answer.approval.approved = True
        if arguments is not None:
            edited = _json_arg(arguments, "--args")
            if not isinstance(edited, dict):
                raise click.BadParameter("must be a JSON object", param_hint="--args")
            answer.approval.arguments.update(edited)
    return answer


def _to_value(value: Any) -> Any:
    from google.protobuf import struct_pb2

    holder = struct_pb2.Struct()
    holder.update({"v": value})
    return holder.fields["v"]


def _outcome(response: pb.AnswerInputResponse) -> str:
    won = rt_pb.AnswerOutcome.Name(response.outcome).removeprefix("ANSWER_OUTCOME_")
    return f"answer {won}: {describe_answer(response.answered.answer)}"


async def _request_id(stub: pb_grpc.GatewayServiceAsyncStub, operation_id: str) -> str:
    request = pb.GetOperationRequest(operation_id=operation_id)
    operation = (await stub.GetOperation(request, timeout=UNARY_TIMEOUT)).operation
    if not operation.input_request_id:
        raise click.ClickException(f"operation {operation_id} has not asked for input")
    return str(operation.input_request_id)


@click.command()
@gateway_option
@json_flag
@click.argument("operation_id")
@click.argument("request_id", required=False, default="")
@click.option("--approve", is_flag=True, help="Approve the tool call as asked.")
@click.option("--reject", metavar="REASON", default=None, help="Reject the tool call, saying why.")
@click.option(
    "--args", "arguments", metavar="JSON", default=None, help="Approve with these arguments."
)
@click.option("--value", metavar="JSON", default=None, help="A free answer (any JSON value).")
@click.option(
    "--answer-id",
    default="",
    help="Your id for this answer: repeating it is harmless (default: a new one).",
)
def answer(
    target: Target,
    as_json: bool,
    operation_id: str,
    request_id: str,
    approve: bool,
    reject: str | None,
    arguments: str | None,
    value: str | None,
    answer_id: str,
) -> None:
    """Answer an operation's input request (REQUEST_ID; default: its newest one)."""
    reply = build_answer(approve, reject, arguments, value)

    async def call(stub: pb_grpc.GatewayServiceAsyncStub) -> pb.AnswerInputResponse:
        request = pb.AnswerInputRequest(
            operation_id=operation_id,
            request_id=request_id or await _request_id(stub, operation_id),
            answer_id=answer_id or f"cli-{uuid.uuid4()}",
            answer=reply,
        )
        return await stub.AnswerInput(request, timeout=UNARY_TIMEOUT)

    response: pb.AnswerInputResponse = asyncio.run(unary_call(target, call, "stopline answer"))
    click.echo(to_json(response) if as_json else _outcome(response))


@click.command()
@gateway_option
@json_flag
@click.argument("operation_id")
def pause(target: Target, as_json: bool, operation_id: str) -> None:
    """Pause an operation: its step in flight is cut; nothing runs until `resume`."""
    request = pb.PauseOperationRequest(operation_id=operation_id)
    _pause_or_resume(
        target,
        as_json,
        "pause",
        lambda stub: stub.PauseOperation(request, timeout=UNARY_TIMEOUT),
        rt_pb.PauseOutcome.Name,
    )


@click.command()
@gateway_option
@json_flag
@click.argument("operation_id")
def resume(target: Target, as_json: bool, operation_id: str) -> None:
    """Resume a paused operation from its last checkpoint."""
    request = pb.ResumeOperationRequest(operation_id=operation_id)
    _pause_or_resume(
        target,
        as_json,
        "resume",
        lambda stub: stub.ResumeOperation(request, timeout=UNARY_TIMEOUT),
        rt_pb.ResumeOutcome.Name,
    )


def _pause_or_resume(
    target: Target,
    as_json: bool,
    verb: str,
    call: Callable[[pb_grpc.GatewayServiceAsyncStub], Any],
    outcome_name: Callable[[Any], str],
) -> None:
    """Make the call of `stopline pause` or `stopline resume` and print its answer: the
    outcome (`pause ACCEPTED`, without its enum's prefix) and the operation's status."""
    response: pb.PauseOperationResponse | pb.ResumeOperationResponse = asyncio.run(
        unary_call(target, call, f"stopline {verb}")
    )
    if as_json:
        click.echo(to_json(response))
        return
    outcome = outcome_name(response.outcome).removeprefix(f"{verb.upper()}_OUTCOME_")
    click.echo(f"{verb} {outcome} ({status_name(response.operation.status)})")


COMMANDS: list[click.Command] = [answer, pause, resume]


# --------------------------------------------------------------------------- the prompt


def reply_for(request: op_pb.InputRequested, lines: list[str]) -> op_pb.InputAnswer | str:
    """The answer a person's typed lines give (for an approval: y / n + reason / e + JSON
    arguments; for a question: JSON, or else the text as a string), or the next question to ask
    when more input is needed."""
    if request.kind != op_pb.INPUT_KIND_APPROVAL:
        if not lines:
            return f"{request.prompt} (JSON, or text): "
        try:
            value = json.loads(lines[0])
        except json.JSONDecodeError:
            value = lines[0]
        reply = op_pb.InputAnswer()
        reply.value.CopyFrom(_to_value(value))
        return reply
    if not lines:
        return "approve? [y]es / [n]o / [e]dit the arguments: "
    choice = lines[0].strip().lower()[:1]
    if choice == "y":
        return op_pb.InputAnswer(approval=op_pb.Approval(approved=True))
    if choice == "n":
        if len(lines) < 2:
            return "reason: "
        return op_pb.InputAnswer(approval=op_pb.Approval(approved=False, reason=lines[1]))
    if choice == "e":
        if len(lines) < 2:
            return "arguments (a JSON object): "
        try:
            edited = json.loads(lines[1])
        except json.JSONDecodeError:
            edited = None
        if not isinstance(edited, dict):
            del lines[1:]
            return "not a JSON object; arguments: "
        reply = op_pb.InputAnswer(approval=op_pb.Approval(approved=True))
        reply.approval.arguments.update(edited)
        return reply
    lines.clear()
    return "please type y, n or e: "


class Prompter:
    """Asks a person at the terminal to answer the requests a stream shows (see the module
    docstring); `say` prints a remark. `on_event` must see each event before it is shown, and
    `before_output` be called before anything else is printed: output that comes while a
    question waits for the person ends the question's line first (and after an event the
    question is shown again, if it still stands)."""

    def __init__(
        self,
        stub: pb_grpc.GatewayServiceAsyncStub,
        operation_id: Callable[[], str],
        say: Callable[[str], None],
    ) -> None:
        self._stub = stub
        self._operation_id = operation_id
        self._say = say
        self._task: asyncio.Task[None] | None = None
        self._request_id = ""
        self._terminal = _Terminal()

    @staticmethod
    def wanted(as_json: bool) -> bool:
        return not as_json and sys.stdin.isatty()

    def on_event(self, event: op_pb.Event) -> None:
        interrupted = self._terminal.interrupt()
        kind = event.WhichOneof("kind")
        if kind == "input_requested":
            self.close()
            self._request_id = event.input_requested.request_id
            self._task = asyncio.create_task(self._ask(event.input_requested))
        elif kind == "input_answered" and event.input_answered.request_id == self._request_id:
            # Answered elsewhere: drop the question. When it is this prompt's answer, the event
            # can arrive before AnswerInput's reply, which is still worth showing.
            if self._terminal.asking:
                self.close()
        elif kind in ("stop_requested", "completed", "failed", "interrupted"):
            self.close()  # (a stop ends a waiting operation at once)
        if interrupted and self._terminal.asking:
            asyncio.get_running_loop().call_soon(self._terminal.show_again)  # after the event

    def before_output(self) -> None:
        self._terminal.interrupt()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        self._terminal.drop()

    async def _ask(self, request: op_pb.InputRequested) -> None:
        op_id = self._operation_id()
        get = pb.GetOperationRequest(operation_id=op_id)
        operation = (await self._stub.GetOperation(get, timeout=UNARY_TIMEOUT)).operation
        if (
            operation.status != op_pb.OPERATION_STATUS_WAITING
            or operation.input_request_id != request.request_id
        ):
            return  # replayed: resolved already
        answer_id = f"cli-{uuid.uuid4()}"
        lines: list[str] = []
        while True:
            step = reply_for(request, lines)
            if isinstance(step, str):
                line = await self._terminal.ask(step)
                if line is None:
                    self._say(f"no answer given here; answer with: stopline answer {op_id}")
                    return
                lines.append(line)
                continue
            call = pb.AnswerInputRequest(
                operation_id=op_id, request_id=request.request_id, answer_id=answer_id, answer=step
            )
            try:
                response = await self._stub.AnswerInput(call, timeout=UNARY_TIMEOUT)
            except aio.AioRpcError as exc:
                self._say(f"answer refused: {exc.code().name}: {exc.details()}")
                if exc.code().name != "INVALID_ARGUMENT":
                    return
                lines.clear()
                continue
            self._say(_outcome(response))
            return


class _Terminal:
    """The lines a person types, one question at a time.

    A line is read on a daemon thread (so the event loop, the stream and Ctrl-C keep going, and
    the thread never holds up the exit). A question dropped while its thread is still blocked
    in the read leaves that thread reading: the next question takes over its line instead of
    starting a second reader, which would let the stale one swallow the person's next answer.
    No thread reads while no question is asked, so what is typed ahead stays in the terminal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[str]] | None = None
        self._reading = False
        self._question: str | None = None  # the question waiting for the person
        self._line_open = False  # ... shown, on a line nothing else has ended
        self._asked: asyncio.Future[str] | None = None  # the read the question waits for

    @property
    def asking(self) -> bool:
        return self._question is not None

    async def ask(self, question: str) -> str | None:
        """The person's line, or None at the end of input (Ctrl-D: not answering here)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        with self._lock:
            self._waiter = (loop, done)
            start, self._reading = not self._reading, True
        self._question = question
        self.show_again()
        if start:
            threading.Thread(target=self._read, name="stopline prompt", daemon=True).start()
        self._asked = done
        try:
            line = await done
        finally:
            if self._asked is done:  # (not already a later question's)
                self._question, self._line_open, self._asked = None, False, None
            with self._lock:
                if self._waiter is not None and self._waiter[1] is done:
                    self._waiter = None
        if not line:  # the end of input: the person's Enter did not end the question's line
            click.echo("")
            return None
        return line.rstrip("\r\n")

    def interrupt(self) -> bool:
        """Something else is about to be printed: end the question's line first."""
        if not self._line_open:
            return False
        click.echo("")
        self._line_open = False
        return True

    def drop(self) -> None:
        """The question no longer stands (its asker is being cancelled)."""
        self._question, self._line_open, self._asked = None, False, None

    def show_again(self) -> None:
        if self._question is not None and not self._line_open:
            click.echo(self._question, nl=False)
            self._line_open = True

    def _read(self) -> None:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):  # the terminal is gone
            line = ""
        with self._lock:
            self._reading = False
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, done = waiter
            with contextlib.suppress(RuntimeError):  # the command has ended meanwhile
                loop.call_soon_threadsafe(_settle, done, line)


def _settle(done: asyncio.Future[str], line: str) -> None:
    if not done.done():  # not cancelled meanwhile (the request was resolved elsewhere)
        done.set_result(line)
