"""`python -m fake_llm`: run the fake on a port until SIGINT/SIGTERM.

Prints `fake_llm listening on <base URL>` (flushed) once it accepts connections, so a parent
process that passed `--port 0` can read the port from the first line."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from fake_llm.script import ScriptError, script_from_json
from fake_llm.server import FakeLLM, ServerConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fake_llm", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8400, help="0 picks a free port")
    p.add_argument("--tokens-per-second", type=float, default=50.0, help="0: as fast as possible")
    p.add_argument("--tokens", type=int, default=20, help="length of a generated answer")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--model", action="append", default=None, help="listed by /v1/models")
    p.add_argument(
        "--stamp-tokens",
        action="store_true",
        help="send each text token as its send time (time.monotonic()), for benchmarks",
    )
    p.add_argument("--script", type=Path, default=None, help="a JSON file: a list of turns")
    return p


def _announce(base_url: str) -> None:
    print(f"fake_llm listening on {base_url}", flush=True)


async def _serve(args: argparse.Namespace, announce: Callable[[str], None]) -> None:
    script = []
    if args.script is not None:
        script = script_from_json(json.loads(args.script.read_text()))
    config = ServerConfig(
        tokens_per_second=args.tokens_per_second,
        default_tokens=args.tokens,
        api_key=args.api_key,
        models=tuple(args.model or ("fake-model",)),
        stamp_tokens=args.stamp_tokens,
    )
    fake = FakeLLM(config, script)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    base_url = await fake.start(args.host, args.port)
    announce(base_url)
    try:
        await done.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None, announce: Callable[[str], None] = _announce) -> int:
    """Serve until SIGINT/SIGTERM; `announce` gets the base URL once connections are accepted
    (`stopline fake-llm` adds how to point the runtime at it)."""
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_serve(args, announce))
    except (OSError, ValueError, ScriptError) as exc:
        print(f"fake_llm: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
