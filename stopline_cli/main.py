"""The `stopline` command: one entry point, a subcommand group per service, and the client
commands (run, attach, stop, ls, show, answer, pause, resume) at the top level because they are
what people type."""

from __future__ import annotations

import click

from gateway_service.cli import gateway
from runtime_service.cli import runtime
from stopline_cli.client import COMMANDS
from stopline_cli.dev import dev
from stopline_cli.fake_llm import fake_llm
from stopline_cli.waiting import COMMANDS as WAITING_COMMANDS


@click.group()
@click.version_option(package_name="stopline")
def main() -> None:
    """Stopline: run long multi-step operations and stop them fast."""


main.add_command(runtime)
main.add_command(gateway)
main.add_command(dev)
main.add_command(fake_llm)
for command in [*COMMANDS, *WAITING_COMMANDS]:
    main.add_command(command)
