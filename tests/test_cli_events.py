"""`stopline run` / `attach` show the structured events readably and `--json` exactly: real
processes (a runtime with a test agent and a tool given by flags, a gateway, the commands)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.credentials import ENV
from tests.processes import GatewayProcess, RuntimeProcess, stopline_command

REPO = Path(__file__).resolve().parent.parent
CALLS = {
    "calls": [
        {"name": "sleep", "arguments": {"seconds": 0}},
        {"name": "boom", "arguments": {}},
        {"name": "sleep", "arguments": {"seconds": -1}},
    ]
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    workdir = tmp_path_factory.mktemp("cli-events")
    args = (
        "--agent",
        "tools=tests.tool_agents:ToolAgent",
        "--tool",
        "boom=tests.tool_agents:BoomTool",
    )
    env = {"PYTHONPATH": str(REPO)}
    runtime = RuntimeProcess(
        f"sqlite:///{workdir / 'runtime.db'}", workdir, extra_args=args, env=env
    )
    try:
        gateway = GatewayProcess(runtime.address, workdir)
        try:
            yield gateway, workdir
        finally:
            gateway.close()
    finally:
        runtime.close()


def stopline(gateway: tuple[GatewayProcess, Path], *args: str) -> subprocess.CompletedProcess[str]:
    process, workdir = gateway
    env = {**os.environ, **ENV, "STOPLINE_GATEWAY_ADDRESS": process.address}
    return subprocess.run(
        [*stopline_command(), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=30,
    )


def test_run_and_attach_show_tool_calls_deltas_and_agent_events(
    gateway: tuple[GatewayProcess, Path],
) -> None:
    run = stopline(gateway, "run", "tools", "--input", json.dumps(CALLS))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    text = "\n".join(lines)
    assert 'plan: {"calls":["sleep","boom","sleep"]}' in text
    assert "  Let me check." in text  # the two deltas, coalesced into one event
    started = [line for line in lines if ": sleep({" in line]
    assert len(started) == 2 and started[0].endswith('sleep({"seconds":0})')
    assert any(line.endswith('finished: {"slept_seconds":0}') for line in lines)
    assert any(line.endswith("FAILED: ValueError: boom: the tool broke") for line in lines)
    assert any("FAILED: arguments.seconds: -1 is less than the minimum of 0" in x for x in lines)
    # attach replays the same lines (after the `accepted` line run prints first).
    operation_id = next(x.split()[-1] for x in lines if "operation" in x.lower())
    attach = stopline(gateway, "attach", operation_id, "--after", "0")
    assert attach.returncode == 0, attach.stderr
    replayed = attach.stdout.splitlines()
    structured = [x for x in lines if "tool call" in x or "plan:" in x or "Let me" in x]
    assert len(structured) == 8 and all(line in replayed for line in structured)


def test_json_prints_the_structured_events_exactly(gateway: tuple[GatewayProcess, Path]) -> None:
    run = stopline(gateway, "run", "tools", "--input", json.dumps(CALLS), "--json")
    assert run.returncode == 0, run.stderr
    # (step 0, the default, is left out as protobuf's JSON mapping leaves out every default)
    events = [u["event"] for u in map(json.loads, run.stdout.splitlines()) if "event" in u]
    by_kind: dict[str, list[Any]] = {}
    for event in events:
        (kind,) = set(event) - {"operation_id", "seq", "time"}
        by_kind.setdefault(kind, []).append(event[kind])
    assert by_kind["agent_event"] == [
        {"kind": "plan", "payload": {"calls": ["sleep", "boom", "sleep"]}}
    ]
    assert by_kind["text_delta"] == [{"text": "Let me check."}]
    started = by_kind["tool_call_started"]
    assert [s["name"] for s in started] == ["sleep", "boom", "sleep"]
    assert started[0]["arguments"] == {"seconds": 0}
    call_ids = [s["call_id"] for s in started]
    assert by_kind["tool_call_finished"] == [
        {"call_id": call_ids[0], "result": {"slept_seconds": 0}}
    ]
    assert [f["call_id"] for f in by_kind["tool_call_failed"]] == call_ids[1:]
    assert by_kind["tool_call_failed"][0]["error"] == "ValueError: boom: the tool broke"


def test_runtime_serve_help_shows_the_tool_and_delta_flags() -> None:
    shown = subprocess.run(
        [*stopline_command(), "runtime", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    for flag in ("--tool", "--delta-flush-seconds", "--delta-flush-chars", "--worker-pool-size"):
        assert flag in shown.stdout


def test_a_run_of_text_deltas_is_shown_on_one_line() -> None:
    from stopline.render import EventLines
    from stopline.v1 import operation_pb2 as op_pb

    def delta(seq: int, text: str, step: int = 0) -> op_pb.Event:
        return op_pb.Event(seq=seq, text_delta=op_pb.TextDelta(step=step, text=text))

    written: list[str] = []
    lines = EventLines(written.append)
    lines.event(delta(4, "Hello,"))
    lines.event(delta(5, " world"))
    lines.line("stopping…")
    lines.event(delta(7, " again"))
    lines.event(delta(8, "next step", step=1))
    lines.event(op_pb.Event(seq=9, step_completed=op_pb.StepCompleted(step=1)))
    assert "".join(written).splitlines() == [
        "[   4]   Hello, world",
        "stopping…",
        "[   7]    again",
        "[   8]   next step",
        "[   9] step 1 completed",
    ]
