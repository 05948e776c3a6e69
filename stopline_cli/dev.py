"""`stopline dev`: the runtime and the gateway in one process on the embedded SQLite default, with
the project's local model server (fake_llm) and a demo operation to stop.

The demo is an `llm` operation against that local server: the model streams a few sentences at a
visible token rate, asks for a slow tool call (`sleep`, with progress), then answers. It goes
through the gateway exactly as a client would (StartAndStream, then StopOperation on Ctrl-C), so
what it shows is the path real clients take. The first Ctrl-C stops the operation (it prints
"stopping…" at once, then the final event with the measured halt, and when the model server saw
its connection closed); all three servers keep serving for the `stopline` client commands,
buf curl and grpcurl until the next Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from grpc import aio

from gateway_service.auth import AuthSettings
from gateway_service.config import GatewayConfig
from gateway_service.keys import ApiKey, new_key
from runtime_service.config import DEFAULT_DATABASE_URL, RuntimeConfig
from stopline import tracing
from stopline.events import TERMINAL_EVENT_KINDS
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import EventLines
from stopline.transport import (
    GATEWAY_ADDRESS_ENV,
    RUNTIME_ADDRESS_ENV,
    SERVICE_TOKEN_ENV,
    TOKEN_ENV,
)
from stopline_cli.connection import Target, connect
from stopline_cli.follower import describe_update

if TYPE_CHECKING:
    from fake_llm.server import FakeLLM
    from gateway_service.server import RunningGateway
    from runtime_service.server import RunningRuntime
    from stopline.metrics import MetricsEndpoint

DEV_TOKEN_FILE = Path(".stopline") / "dev-token"
DEMO_TOKENS_PER_SECOND = 15.0
DEMO_SLEEP_SECONDS = 6
DEMO_INTRO = (
    "Hello! I am the llm agent, streaming this answer from a local model server one token at a "
    "time. Press Ctrl-C while I am still writing and the runtime cuts me off mid-sentence: the "
    "HTTP stream to the model closes at once and the words so far are kept for the next turn. Now "
    f"let me call a slow tool that sleeps for {DEMO_SLEEP_SECONDS} seconds."
)
DEMO_OUTRO = (
    "The tool is done and nobody stopped me, so here is the end of the answer. Run stopline "
    "dev again and press Ctrl-C while I am talking."
)
DEMO_INPUT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Show me what a stop does."}],
    "tools": ["sleep"],
}


def demo_script() -> list[Any]:
    """What the local model answers the demo: text, a call of the slow tool, then more text."""
    from fake_llm.script import TextTurn, ToolCall, ToolCallsTurn

    arguments = json.dumps({"seconds": DEMO_SLEEP_SECONDS})
    return [
        ToolCallsTurn(
            text=DEMO_INTRO,
            calls=(ToolCall("sleep", arguments),),
            tokens_per_second=DEMO_TOKENS_PER_SECOND,
        ),
        TextTurn(text=DEMO_OUTRO, tokens_per_second=DEMO_TOKENS_PER_SECOND),
    ]


async def _demo(gateway: Target, interrupts: asyncio.Queue[None], fake: FakeLLM) -> None:
    request = pb.StartAndStreamRequest(agent="llm", cancel_policy=pb.CANCEL_POLICY_STOP)
    request.input.update(DEMO_INPUT)
    fake.set_script(demo_script())
    lines = EventLines(lambda text: click.echo(text, nl=False))
    ctrl_c_at: list[float] = []
    async with connect(gateway) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        operation_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def stop_on_ctrl_c() -> None:
            await interrupts.get()
            ctrl_c_at.append(time.monotonic())
            lines.line("stopping…")
            # A Ctrl-C during the start is kept until the id is known, not dropped.
            stop = pb.StopOperationRequest(operation_id=await operation_id, reason="Ctrl-C")
            try:
                response = await stub.StopOperation(stop, timeout=10)
            except aio.AioRpcError as exc:
                lines.end_line()
                click.echo(f"stop failed: {exc.code().name}: {exc.details()}", err=True)
                return
            if response.delivery == pb.STOP_DELIVERY_PENDING:
                lines.line("stop accepted; still being delivered to the runtime")

        stopper = asyncio.create_task(stop_on_ctrl_c())
        try:
            async for update in stub.StartAndStream(request):
                if update.HasField("accepted"):
                    operation_id.set_result(update.accepted.operation_id)
                    lines.line(
                        f"demo operation {update.accepted.operation_id}: the llm agent streams "
                        f"an answer from the local model at {DEMO_TOKENS_PER_SECOND:g} tokens/s, "
                        f"calls a {DEMO_SLEEP_SECONDS} s tool, then answers. "
                        "Press Ctrl-C to stop it.\n"
                    )
                    continue
                if not update.HasField("event"):
                    lines.line(describe_update(update))
                    continue
                lines.event(update.event)
                if update.event.WhichOneof("kind") in TERMINAL_EVENT_KINDS:
                    break
            if ctrl_c_at:
                _report_model_stream(fake, ctrl_c_at[0])
        except aio.AioRpcError as exc:
            lines.end_line()
            click.echo(f"demo failed: {exc.code().name}: {exc.details()}", err=True)
        finally:
            lines.end_line()
            stopper.cancel()
            fake.set_script([])  # later llm operations get generated answers


def _report_model_stream(fake: FakeLLM, ctrl_c_at: float) -> None:
    """Say when the model server saw the stream closed, if the stop cut one (both clocks are
    this process's monotonic clock)."""
    closed = [r for r in fake.requests if r.client_closed_at is not None]
    if closed and closed[-1].client_closed_at is not None:
        after_ms = (closed[-1].client_closed_at - ctrl_c_at) * 1000
        click.echo(
            f"the model server saw its stream closed {after_ms:.0f} ms after Ctrl-C, "
            f"having sent {closed[-1].tokens_sent} tokens"
        )


DEV_METRICS_ADDRESS = "127.0.0.1:0"


def _metrics_url(endpoint: MetricsEndpoint | None) -> str:
    return "off" if endpoint is None else f"http://127.0.0.1:{endpoint.port}/metrics"


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


async def run_dev(
    runtime_config: RuntimeConfig, gateway_address: str, demo: bool, fake_llm_port: int = 0
) -> None:
    # Imported here: the servers pull in SQLAlchemy and Alembic, which every other `stopline`
    # command would otherwise pay for at start-up.
    from fake_llm.server import FakeLLM, ServerConfig
    from gateway_service.server import start_gateway
    from runtime_service.server import start_runtime

    interrupts: asyncio.Queue[None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupts.put_nowait, None)
    loop.add_signal_handler(signal.SIGTERM, interrupts.put_nowait, None)
    runtime: RunningRuntime | None = None
    gateway: RunningGateway | None = None
    fake = FakeLLM(ServerConfig(tokens_per_second=DEMO_TOKENS_PER_SECOND))
    try:
        token, key, service_token = _dev_credentials()
        fake_url = await fake.start("127.0.0.1", fake_llm_port)
        runtime_config = replace(
            runtime_config,
            service_tokens=(service_token,),
            # Metrics on in development, each on a free port (printed below).
            metrics_address=runtime_config.metrics_address or DEV_METRICS_ADDRESS,
            llm=replace(runtime_config.llm, base_url=fake_url, model="fake-model"),
        )
        runtime = await start_runtime(runtime_config)
        runtime_address = _dialable(runtime_config.address, runtime.port)
        gateway = await start_gateway(
            GatewayConfig(
                address=gateway_address,
                runtime_address=runtime_address,
                auth=AuthSettings(keys=(key,)),
                service_token=service_token,
                metrics_address=DEV_METRICS_ADDRESS,
            )
        )
        served_gateway = _dialable(gateway_address, gateway.port)
        click.echo(f"runtime serving on {runtime_address} (database {runtime_config.database_url})")
        click.echo(f"gateway serving on {served_gateway} (runtime {runtime_address})")
        click.echo(f"local model server (fake_llm) on {fake_url}, the llm agent's provider")
        click.echo(
            f"Prometheus metrics: runtime {_metrics_url(runtime.metrics)}, "
            f"gateway {_metrics_url(gateway.metrics)}"
        )
        click.echo(
            f"development API key (principal dev; also in {DEV_TOKEN_FILE}):\n"
            f"  export {TOKEN_ENV}={token}\n"
            f"runtime service credential (for `stopline runtime ...` commands):\n"
            f"  export {SERVICE_TOKEN_ENV}={service_token}"
        )
        if demo:
            await _demo(Target(served_gateway, token), interrupts, fake)
        click.echo(
            f"\nstill serving on {served_gateway}, {runtime_address} and {fake_url}; Ctrl-C to quit"
        )
        await interrupts.get()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        if gateway is not None:
            await gateway.stop(grace=1.0)
        if runtime is not None:
            await runtime.stop(grace=1.0)
        await fake.stop()


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
@click.option(
    "--fake-llm-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the local model server the llm agent talks to (0: any free port).",
)
def dev(
    address: str, gateway_address: str, database_url: str, demo: bool, fake_llm_port: int
) -> None:
    """Run the runtime, the gateway and a local model server on SQLite, with an llm demo you can
    stop with Ctrl-C."""
    config = RuntimeConfig(address=address, database_url=database_url)
    try:
        tracing.configure_from_env(
            "stopline-dev", export_process=True
        )  # off unless OTEL_* variables say otherwise
        asyncio.run(run_dev(config, gateway_address, demo, fake_llm_port))
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        tracing.shutdown()
