"""The `stopline` command: one entry point, a subcommand group per service."""

from __future__ import annotations

import click

from runtime_service.cli import runtime
from stopline.dev import dev


@click.group()
@click.version_option(package_name="stopline")
def main() -> None:
    """Stopline: run long multi-step operations and stop them fast."""


main.add_command(runtime)
main.add_command(dev)

if __name__ == "__main__":
    main()
