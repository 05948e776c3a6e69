"""README's "Writing an agent" example, run as printed: its module is written to a directory, the
runtime is started with the section's `--agent` flag, and `stopline run` must print the
transcript the section shows (seq numbers and call ids aside: how many deltas share one event
depends on timing) and complete with the expected result."""

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
TITLE = "### Writing an agent"
VARYING = [
    (re.compile(r"call_[0-9a-f]{16}"), "call_X"),
    (re.compile(r"^\[ *\d+\]"), "[seq]"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "ID"),
]


def section() -> str:
    text = README.read_text()
    start = text.index(TITLE)
    end = re.compile(r"\n#{2,3} ").search(text, start + 1)
    assert end is not None
    return text[start : end.start()]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def normalised(line: str) -> str:
    for pattern, replacement in VARYING:
        line = pattern.sub(replacement, line)
    return line


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    workdir = tmp_path_factory.mktemp("agent-example")
    for code in blocks(section(), "python"):
        path = workdir / code.splitlines()[0].removeprefix("# ").strip()
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(code)
    serve = blocks(section(), "sh")[0].replace("\\\n", " ").splitlines()[0]
    extra: list[str] = []
    for flag, value in itertools.pairwise(shlex.split(serve)):
        if flag == "--agent":
            extra += [flag, value]
    assert len(extra) == 2
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


def test_the_agent_example_runs_as_printed(example: tuple[GatewayProcess, Path]) -> None:
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
    printed = [normalised(line) for line in done.stdout.splitlines()]
    shown = [normalised(line) for line in blocks(section(), "text")[0].splitlines()]
    assert len(shown) >= 10 and printed[1:] == shown, done.stdout
    result = json.loads(done.stdout.split("COMPLETED: ", 1)[1].splitlines()[0])
    assert result == {"slept_seconds": 1}
