"""README's "Writing a tool" example, run as printed: its two modules are written to a directory,
the runtime is started with the section's `--tool` and `--agent` flags, and `stopline run` must
print the transcript the section shows (call ids aside) and complete with the expected result."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.credentials import ENV
from tests.processes import GatewayProcess, RuntimeProcess, stopline_command

README = Path(__file__).resolve().parent.parent / "README.md"
REPO = README.parent
CALL_ID = re.compile(r"call_[0-9a-f]{16}")


def section() -> str:
    text = README.read_text()
    start = text.index("## Writing a tool")
    return text[start : text.index("\n## ", start + 1)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    workdir = tmp_path_factory.mktemp("tool-example")
    for code in blocks(section(), "python"):
        path = workdir / code.splitlines()[0].removeprefix("# ").strip()
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(code)
    serve = blocks(section(), "sh")[0].replace("\\\n", " ").splitlines()[0]
    words = shlex.split(serve)
    extra: list[str] = []
    for flag, value in itertools.pairwise(words):
        if flag in ("--tool", "--agent"):
            extra += [flag, value]
    assert extra.count("--tool") == 2 and extra.count("--agent") == 1
    env = {"PYTHONPATH": f"{workdir}{os.pathsep}{REPO}"}
    url = f"sqlite:///{workdir / 'runtime.db'}"
    runtime = RuntimeProcess(url, workdir, extra_args=tuple(extra), env=env)
    try:
        gateway = GatewayProcess(runtime.address, workdir)
        try:
            yield gateway, workdir
        finally:
            gateway.close()
    finally:
        runtime.close()


def test_the_tool_example_runs_as_printed(example: tuple[GatewayProcess, Path]) -> None:
    gateway, workdir = example
    (run_line,) = [
        x for x in blocks(section(), "sh")[0].splitlines() if x.startswith("stopline run")
    ]
    env = {**os.environ, **ENV, "STOPLINE_GATEWAY_ADDRESS": gateway.address}
    done = subprocess.run(
        [*stopline_command(), *shlex.split(run_line)[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = CALL_ID.sub("call_X", done.stdout).splitlines()
    shown = [line for line in section().splitlines() if line.startswith("[ ")]
    transcript = [CALL_ID.sub("call_X", line) for line in shown]
    assert len(transcript) == 7 and all(line in printed for line in transcript), done.stdout
    result = json.loads(done.stdout.split("COMPLETED: ", 1)[1].splitlines()[0])
    assert result == {"counts": {"to": 2, "be": 2, "or": 1, "not": 1}, "top": "TO"}
