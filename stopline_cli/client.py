"""Client commands of `stopline`, all through the gateway: run, attach, stop, ls, show.

`run` and `attach` follow the operation's stream (follower.py); every command reaches the gateway
as connection.py says (options, channel, trace span, errors).

Exit status says how the operation ended: 0 COMPLETED, 1 FAILED, 130 INTERRUPTED (or left with a
second Ctrl-C); errors from the gateway exit 1, or 69 (EX_UNAVAILABLE) when a retry could fix them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import click
from google.protobuf import duration_pb2

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import (
    LIST_LIMIT,
    STATUS_FILTERS,
    describe_operation,
    json_flag,
    status_name,
    status_value,
    to_json,
)
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline_cli.connection import (
    UNARY_TIMEOUT,
    Target,
    command_span,
    connect,
    gateway_option,
    gateway_stub,
    unary_call,
)
from stopline_cli.follower import Follower, describe_update
from stopline_cli.waiting import Prompter

# With the names that callers import from here, though connection.py and follower.py define them.
__all__ = [
    "COMMANDS",
    "POLICIES",
    "UNARY_TIMEOUT",
    "Follower",
    "Target",
    "attach",
    "command_span",
    "connect",
    "describe_update",
    "list_operations",
    "run",
    "show",
    "start_request",
    "stop",
]

POLICIES = {
    "stop": pb.CANCEL_POLICY_STOP,
    "keep": pb.CANCEL_POLICY_KEEP_RUNNING,
    "grace": pb.CANCEL_POLICY_STOP_AFTER_GRACE,
}


def _parse_input(input_json: str) -> dict[str, Any]:
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    return value


def start_request(
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
    """The start `stopline run` asks for; options that contradict each other are a usage error
    here, before anything reaches the gateway."""
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
@gateway_option
@json_flag
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
    request = start_request(
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
                stub = gateway_stub(channel)
                follower = Follower(stub, as_json, detach=detach, idempotency_key=key)
                _prompt_for_input(follower, stub, as_json)
                with follower.ctrl_c_handled():
                    return await follower.follow(lambda: stub.StartAndStream(request))

    sys.exit(asyncio.run(session()))


@click.command()
@gateway_option
@json_flag
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
                stub = gateway_stub(channel)
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
    if Prompter.wanted(as_json):
        prompter = Prompter(stub, follower.operation_id, follower.say)
        follower.on_event = prompter.on_event
        follower.before_output = prompter.before_output


@click.command()
@gateway_option
@json_flag
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
        unary_call(
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
@gateway_option
@json_flag
@click.option("--status", type=click.Choice(STATUS_FILTERS), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=LIST_LIMIT, show_default=True)
def list_operations(target: Target, as_json: bool, status: str | None, limit: int) -> None:
    """List operations, newest first."""
    request = pb.ListOperationsRequest(status=status_value(status or ""), page_size=limit)
    response: pb.ListOperationsResponse = asyncio.run(
        unary_call(
            target, lambda stub: stub.ListOperations(request, timeout=UNARY_TIMEOUT), "stopline ls"
        )
    )
    for operation in response.operations:
        click.echo(to_json(operation) if as_json else describe_operation(operation))


@click.command()
@gateway_option
@json_flag
@click.argument("operation_id")
def show(target: Target, as_json: bool, operation_id: str) -> None:
    """Show one operation."""
    request = pb.GetOperationRequest(operation_id=operation_id)
    response: pb.GetOperationResponse = asyncio.run(
        unary_call(
            target, lambda stub: stub.GetOperation(request, timeout=UNARY_TIMEOUT), "stopline show"
        )
    )
    operation = response.operation
    click.echo(to_json(operation) if as_json else describe_operation(operation))


COMMANDS: list[click.Command] = [run, attach, stop, list_operations, show]
