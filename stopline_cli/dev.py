"""`stopline dev`: the runtime and the gateway in one process on the embedded SQLite default, with
a demo operation to stop.

The demo goes through the gateway exactly as a client would (StartAndStream, then StopOperation
on Ctrl-C), so what it shows is the path real clients take. The first Ctrl-C stops the operation
(it prints "stopping…" at once, then the final status with the measured halt time); both services
keep serving for the `stopline` client commands, buf curl and grpcurl until the next Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from grpc import aio

from gateway_service.auth import AuthSettings
from gateway_service.config import GatewayConfig
from gateway_service.keys import ApiKey, new_key
from runtime_service.config import DEFAULT_DATABASE_URL, RuntimeConfig
from stopline.events import TERMINAL_EVENT_KINDS
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.transport import (
    GATEWAY_ADDRESS_ENV,
    RUNTIME_ADDRESS_ENV,
    SERVICE_TOKEN_ENV,
    TOKEN_ENV,
)
from stopline_cli.client import Target, connect, describe_update

if TYPE_CHECKING:
    from gateway_service.server import RunningGateway
    from runtime_service.server import RunningRuntime

DEMO_INPUT: dict[str, Any] = {"steps": 5, "step_seconds": 10, "chunk_interval_seconds": 1}
DEV_TOKEN_FILE = Path(".stopline") / "dev-token"


async def _demo(gateway: Target, interrupts: asyncio.Queue[None]) -> None:
    request = pb.StartAndStreamRequest(agent="ticker", cancel_policy=pb.CANCEL_POLICY_STOP)
    request.input.update(DEMO_INPUT)
    async with connect(gateway) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        operation_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def stop_on_ctrl_c() -> None:
            await interrupts.get()
            click.echo("stopping…")
            # A Ctrl-C during the start is kept until the id is known, not dropped.
            stop = pb.StopOperationRequest(operation_id=await operation_id, reason="Ctrl-C")
            try:
                response = await stub.StopOperation(stop, timeout=10)
            except aio.AioRpcError as exc:
                click.echo(f"stop failed: {exc.code().name}: {exc.details()}", err=True)
                return
            if response.delivery == pb.STOP_DELIVERY_PENDING:
                click.echo("stop accepted; still being delivered to the runtime")

        stopper = asyncio.create_task(stop_on_ctrl_c())
        try:
            async for update in stub.StartAndStream(request):
                if update.HasField("accepted"):
                    operation_id.set_result(update.accepted.operation_id)
                    click.echo(
                        f"demo operation {update.accepted.operation_id}: 5 steps of 10 s. "
                        "Press Ctrl-C to stop it.\n"
                    )
                    continue
                click.echo(describe_update(update))
                if (
                    update.HasField("event")
                    and update.event.WhichOneof("kind") in TERMINAL_EVENT_KINDS
                ):
                    break
        except aio.AioRpcError as exc:
            click.echo(f"demo failed: {exc.code().name}: {exc.details()}", err=True)
        finally:
            stopper.cancel()


def _dialable(address: str, port: int) -> str:
    """Where the gateway reaches the runtime: the listening host with the port actually bound
    (the configured one may be 0)."""
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


def _dev_credentials() -> tuple[str, ApiKey, str]:
    """A fresh API key (principal "dev") and service credential for this run only, so nothing
    reusable is left behind; the key is also written to .stopline/dev-token for other shells."""
    token, key = new_key("dev")
    service_token = secrets.token_urlsafe(32)
    DEV_TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(DEV_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, key, service_token


async def run_dev(runtime_config: RuntimeConfig, gateway_address: str, demo: bool) -> None:
    # Imported here: the servers pull in SQLAlchemy and Alembic, which every other `stopline`
    # command would otherwise pay for at start-up.
    from gateway_service.server import start_gateway
    from runtime_service.server import start_runtime

    interrupts: asyncio.Queue[None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupts.put_nowait, None)
    loop.add_signal_handler(signal.SIGTERM, interrupts.put_nowait, None)
    runtime: RunningRuntime | None = None
    gateway: RunningGateway | None = None
    try:
        token, key, service_token = _dev_credentials()
        runtime_config = replace(runtime_config, service_tokens=(service_token,))
        runtime = await start_runtime(runtime_config)
        runtime_address = _dialable(runtime_config.address, runtime.port)
        gateway = await start_gateway(
            GatewayConfig(
                address=gateway_address,
                runtime_address=runtime_address,
                auth=AuthSettings(keys=(key,)),
                service_token=service_token,
            )
        )
        served_gateway = _dialable(gateway_address, gateway.port)
        click.echo(f"runtime serving on {runtime_address} (database {runtime_config.database_url})")
        click.echo(f"gateway serving on {served_gateway} (runtime {runtime_address})")
        click.echo(
            f"development API key (principal dev; also in {DEV_TOKEN_FILE}):\n"
            f"  export {TOKEN_ENV}={token}\n"
            f"runtime service credential (for `stopline runtime ...` commands):\n"
            f"  export {SERVICE_TOKEN_ENV}={service_token}"
        )
        if demo:
            await _demo(Target(served_gateway, token), interrupts)
        click.echo(f"\nstill serving on {served_gateway} and {runtime_address}; Ctrl-C to quit")
        await interrupts.get()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        if gateway is not None:
            await gateway.stop(grace=1.0)
        if runtime is not None:
            await runtime.stop(grace=1.0)


@click.command()
@click.option(
    "--address",
    envvar=RUNTIME_ADDRESS_ENV,
    default=RuntimeConfig().address,
    show_default=True,
    help="host:port the runtime listens on.",
)
@click.option(
    "--gateway-address",
    envvar=GATEWAY_ADDRESS_ENV,
    default=GatewayConfig().address,
    show_default=True,
    help="host:port the gateway listens on.",
)
@click.option(
    "--database-url",
    envvar="STOPLINE_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
)
@click.option(
    "--demo/--no-demo", default=True, show_default=True, help="Stream a stoppable demo operation."
)
def dev(address: str, gateway_address: str, database_url: str, demo: bool) -> None:
    """Run the runtime and the gateway locally on SQLite, with a demo you can stop with Ctrl-C."""
    config = RuntimeConfig(address=address, database_url=database_url)
    try:
        asyncio.run(run_dev(config, gateway_address, demo))
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
