"""`stopline fake-llm`: the project's local OpenAI-compatible server (fake_llm), for trying the
`llm` agent, its stops and its tool calls without a provider account. A thin wrapper over
`python -m fake_llm` with its everyday options; the module alone has `--model` (names listed by
/v1/models) and the benchmarks' `--stamp-tokens`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("fake-llm")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8400, show_default=True, help="0: any free."
)
@click.option(
    "--tokens-per-second",
    type=click.FloatRange(min=0),
    default=50.0,
    show_default=True,
    help="How fast answers stream (0: as fast as possible).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Length of a generated answer (when the script has no turn left).",
)
@click.option(
    "--script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON file: a list of turns answered in order (text, tool_calls, error).",
)
@click.option("--api-key", default=None, help="Require this bearer key (default: accept any).")
def fake_llm(
    host: str,
    port: int,
    tokens_per_second: float,
    tokens: int,
    script: Path | None,
    api_key: str | None,
) -> None:
    """Serve a local OpenAI-compatible Chat Completions API until Ctrl-C.

    It streams scripted or generated answers at a set token rate, asks for tool calls, answers
    400 to conversations the real API would refuse, and records when each client closed its
    connection (GET /_fake/requests)."""
    from fake_llm.__main__ import main

    def announce(base_url: str) -> None:
        click.echo(f"fake_llm listening on {base_url}")
        click.echo(f"  point the llm agent at it: stopline runtime serve --llm-base-url {base_url}")
        click.echo(f"  or: export OPENAI_BASE_URL={base_url}")

    argv = ["--host", host, "--port", str(port), "--tokens-per-second", str(tokens_per_second)]
    argv += ["--tokens", str(tokens)]
    if script is not None:
        argv += ["--script", str(script)]
    if api_key is not None:
        argv += ["--api-key", api_key]
    code = main(argv, announce)
    if code:
        raise SystemExit(code)
