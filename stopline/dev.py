"""`stopline dev`: the runtime on the embedded SQLite default, with a demo operation to stop.

The demo streams a long `ticker` operation in the terminal. The first Ctrl-C stops the operation
(it prints "stopping…" at once, then the final status with the measured halt time); the services
keep serving for buf curl / grpcurl until the next Ctrl-C.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import click

from runtime_service import convert
from runtime_service.config import RuntimeConfig
from runtime_service.render import describe_event
from runtime_service.server import RunningRuntime, start_runtime

DEMO_INPUT: dict[str, Any] = {"steps": 5, "step_seconds": 10, "chunk_interval_seconds": 1}


async def _demo(running: RunningRuntime, interrupts: asyncio.Queue[None]) -> None:
    ops = running.app.operations
    operation = (await ops.start("ticker", DEMO_INPUT, "")).operation
    click.echo(f"demo operation {operation.id}: 5 steps of 10 s. Press Ctrl-C to stop it.\n")

    async def stop_on_ctrl_c() -> None:
        await interrupts.get()
        click.echo("stopping…")
        await ops.interrupt(operation.id, "stopline dev", "Ctrl-C")

    stopper = asyncio.create_task(stop_on_ctrl_c())
    try:
        async for event in ops.watch(operation.id, 0):
            click.echo(describe_event(convert.event_to_pb(event)))
    finally:
        stopper.cancel()


async def run_dev(config: RuntimeConfig, demo: bool) -> None:
    running = await start_runtime(config)
    interrupts: asyncio.Queue[None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupts.put_nowait, None)
    loop.add_signal_handler(signal.SIGTERM, interrupts.put_nowait, None)
    try:
        click.echo(f"runtime serving on {running.address} (database {config.database_url})")
        if demo:
            await _demo(running, interrupts)
        click.echo(f"\nstill serving on {running.address}; Ctrl-C to quit")
        await interrupts.get()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await running.stop(grace=1.0)


@click.command()
@click.option(
    "--address", envvar="STOPLINE_RUNTIME_ADDRESS", default="127.0.0.1:50051", show_default=True
)
@click.option(
    "--database-url",
    envvar="STOPLINE_DATABASE_URL",
    default="sqlite:///.stopline/runtime.db",
    show_default=True,
)
@click.option(
    "--demo/--no-demo", default=True, show_default=True, help="Stream a stoppable demo operation."
)
def dev(address: str, database_url: str, demo: bool) -> None:
    """Run Stopline locally on SQLite, with a demo operation you can stop with Ctrl-C."""
    config = RuntimeConfig(address=address, database_url=database_url)
    try:
        asyncio.run(run_dev(config, demo))
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
