"""`stopline runtime start|watch|stop|get|ls`: the same operations as the client commands, sent
straight to one runtime (bypassing the gateway), for debugging the runtime on its own."""

from __future__ import annotations

import json
import sys

import click

from runtime_service.cli_options import runtime_option
from runtime_service.client import ClientError, RuntimeClient
from stopline.render import (
    EXIT_BY_TERMINAL_EVENT,
    LIST_LIMIT,
    STATUS_FILTERS,
    describe_event,
    describe_operation,
    json_flag,
    status_name,
    status_value,
    to_json,
)


def _client(address: str) -> RuntimeClient:
    return RuntimeClient.connect(address)


def _fail(exc: ClientError) -> None:
    raise click.ClickException(str(exc))


@click.command()
@runtime_option
@json_flag
@click.argument("agent")
@click.option("--input", "input_json", default="{}", help="Agent input as a JSON object.")
@click.option("--idempotency-key", default="")
@click.option("--watch/--no-watch", default=True, help="Stream events until the operation ends.")
def start(
    address: str, as_json: bool, agent: str, input_json: str, idempotency_key: str, watch: bool
) -> None:
    """Start an operation of AGENT (and by default stream its events)."""
    try:
        input_value = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    if not isinstance(input_value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    client = _client(address)
    try:
        response = client.start(agent, input_value, idempotency_key)
    except ClientError as exc:
        _fail(exc)
        return
    operation = response.operation
    click.echo(to_json(operation) if as_json else f"operation {operation.id}")
    if watch:
        _stream(client, operation.id, 0, as_json)


def _stream(client: RuntimeClient, operation_id: str, after_seq: int, as_json: bool) -> None:
    try:
        for event in client.watch(operation_id, after_seq):
            click.echo(to_json(event) if as_json else describe_event(event))
        final = client.get(operation_id)
    except ClientError as exc:
        _fail(exc)
        return
    sys.exit(EXIT_BY_TERMINAL_EVENT.get(status_name(final.status).lower(), 0))


@click.command()
@runtime_option
@json_flag
@click.argument("operation_id")
@click.option(
    "--after",
    "after_seq",
    type=int,
    default=0,
    show_default=True,
    help="Stream events after this seq.",
)
def watch(address: str, as_json: bool, operation_id: str, after_seq: int) -> None:
    """Stream an operation's events from --after until it ends."""
    _stream(_client(address), operation_id, after_seq, as_json)


@click.command()
@runtime_option
@json_flag
@click.argument("operation_id")
@click.option("--reason", default="stopped from the command line")
@click.option("--by", "requested_by", default="stopline-cli")
def stop(address: str, as_json: bool, operation_id: str, reason: str, requested_by: str) -> None:
    """Stop an operation (idempotent; says whether this call stopped it)."""
    try:
        response = _client(address).interrupt(operation_id, requested_by, reason)
    except ClientError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(to_json(response))
        return
    outcome = {1: "stop accepted", 2: "a stop was already requested", 3: "already finished"}
    said = outcome.get(response.outcome, "unknown outcome")
    click.echo(f"{said}: {status_name(response.operation.status)}")


@click.command()
@runtime_option
@json_flag
@click.argument("operation_id")
def get(address: str, as_json: bool, operation_id: str) -> None:
    """Show one operation."""
    try:
        operation = _client(address).get(operation_id)
    except ClientError as exc:
        _fail(exc)
        return
    click.echo(to_json(operation) if as_json else describe_operation(operation))


@click.command("ls")
@runtime_option
@json_flag
@click.option("--status", type=click.Choice(STATUS_FILTERS), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=LIST_LIMIT, show_default=True)
def list_operations(address: str, as_json: bool, status: str | None, limit: int) -> None:
    """List operations, newest first."""
    try:
        response = _client(address).list(status_value(status or ""), limit)
    except ClientError as exc:
        _fail(exc)
        return
    for operation in response.operations:
        click.echo(to_json(operation) if as_json else describe_operation(operation))


COMMANDS: list[click.Command] = [start, watch, stop, get, list_operations]
