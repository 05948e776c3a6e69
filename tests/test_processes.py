"""The runtime as a real process: kill -9 and restart, SIGTERM, and the command line."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from runtime_service.client import RuntimeClient
from stopline.v1 import operation_pb2 as op_pb
from tests.credentials import SERVICE_TOKEN
from tests.processes import RuntimeProcess, stopline_command


def test_killed_runtime_resumes_from_last_completed_step(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    first = RuntimeProcess(url, tmp_path)
    try:
        client = RuntimeClient.connect(first.address, token=SERVICE_TOKEN)
        op = client.start(
            "ticker", {"steps": 4, "step_seconds": 1, "chunk_interval_seconds": 0.2}
        ).operation
        seen: list[op_pb.Event] = []
        for event in client.watch(op.id):
            seen.append(event)
            if event.WhichOneof("kind") == "step_started" and event.step_started.step == 1:
                break  # step 0 is checkpointed, step 1 is in flight
        first.kill()
    finally:
        first.close()

    second = RuntimeProcess(url, tmp_path, port=first.port)
    try:
        client = RuntimeClient.connect(second.address, token=SERVICE_TOKEN)
        rest = list(client.watch(op.id, after_seq=seen[-1].seq))
        seqs = [e.seq for e in seen + rest]
        assert seqs == list(range(1, len(seqs) + 1)), "gap or repeat across the crash"
        kinds = [e.WhichOneof("kind") for e in rest]
        assert kinds[-1] == "completed"
        resumed = next(e for e in rest if e.WhichOneof("kind") == "started")
        assert resumed.started.resumed and resumed.started.from_step == 1
        steps_started = [
            e.step_started.step for e in rest if e.WhichOneof("kind") == "step_started"
        ]
        assert steps_started == [1, 2, 3]  # step 0 was not run again
        assert client.get(op.id).steps_completed == 4
    finally:
        second.close()


def test_sigterm_shuts_down_gracefully_and_leaves_work_resumable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    runtime = RuntimeProcess(url, tmp_path)
    try:
        client = RuntimeClient.connect(runtime.address, token=SERVICE_TOKEN)
        op = client.start("ticker", {"steps": 2, "step_seconds": 30}).operation
        for event in client.watch(op.id):
            if event.WhichOneof("kind") == "output_chunk":
                break
        assert runtime.terminate() == 0
    finally:
        runtime.close()
    again = RuntimeProcess(url, tmp_path)
    try:
        client = RuntimeClient.connect(again.address, token=SERVICE_TOKEN)
        operation = client.get(op.id)
        assert operation.status == op_pb.OPERATION_STATUS_RUNNING  # resumed, not failed or lost
        assert client.interrupt(op.id).outcome == 1
        assert list(client.watch(op.id))[-1].WhichOneof("kind") == "interrupted"
    finally:
        again.close()


def test_cli_start_streams_and_cli_stop_halts_a_long_step(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    runtime = RuntimeProcess(url, tmp_path)
    try:
        target = ["--runtime", runtime.address]
        run = subprocess.Popen(
            [
                *stopline_command(),
                "runtime",
                "start",
                "ticker",
                *target,
                "--input",
                '{"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 1}',
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert run.stdout is not None
        first_line = run.stdout.readline()
        assert first_line.startswith("operation ")
        op_id = first_line.split()[1]
        for line in run.stdout:
            if "tick 0" in line:
                break
        began = time.monotonic()
        stop = subprocess.run(
            [*stopline_command(), "runtime", "stop", op_id, *target],
            capture_output=True,
            text=True,
            check=True,
        )
        assert stop.stdout.startswith("stop accepted")
        rest = run.stdout.read()
        code = run.wait(timeout=20)
        assert time.monotonic() - began < 15
        assert "INTERRUPTED mid-step 0" in rest and "ms after the stop" in rest
        assert code == 130
        again = subprocess.run(
            [*stopline_command(), "runtime", "stop", op_id, *target], capture_output=True, text=True
        )
        assert "already requested" in again.stdout
        bad = subprocess.run(
            [*stopline_command(), "runtime", "get", "nope", *target], capture_output=True, text=True
        )
        assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr
    finally:
        runtime.close()
        if "run" in locals() and run.poll() is None:
            run.send_signal(signal.SIGKILL)


def _read_until(stream: IO[bytes], seen: bytearray, done: Callable[[str], bool]) -> str:
    """Read what the process prints, as it comes (not line by line: a model's answer stays on
    one line while it streams), until `done` holds for all of it, or fail at a deadline."""
    deadline = time.monotonic() + 60
    while not done(seen.decode(errors="replace")):
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, "the process ended: " + seen.decode(errors="replace")
            seen += chunk
    return seen.decode(errors="replace")


def test_dev_demo_stops_on_ctrl_c_mid_token_and_reports_halt_time(tmp_path: Path) -> None:
    from stopline_cli.dev import DEMO_INTRO
    from tests.processes import free_port

    address = f"127.0.0.1:{free_port()}"
    gateway_address = f"127.0.0.1:{free_port()}"
    dev = subprocess.Popen(
        [*stopline_command(), "dev", "--address", address, "--gateway-address", gateway_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        assert dev.stdout is not None
        seen = bytearray()

        def streaming(text: str) -> bool:  # a few of the model's words on the screen
            _, _, answer = text.partition("   Hello!")
            return len(answer.split()) >= 3

        before = _read_until(dev.stdout, seen, streaming)
        assert f"gateway serving on {gateway_address}" in before
        assert "local model server (fake_llm) on http://127.0.0.1:" in before
        dev.send_signal(signal.SIGINT)
        text = _read_until(dev.stdout, seen, lambda t: "still serving" in t)
        assert "stopping…" in text
        assert "INTERRUPTED mid-step 0" in text and "ms after the stop" in text
        assert text.index("stopping…") < text.index("INTERRUPTED")
        assert "the model server saw its stream closed" in text
        # The answer was cut: its line ends before the intro does, and the stop came mid-stream.
        answer_line = text[text.index("   Hello!") + 3 : text.index("stopping…")].strip()
        assert DEMO_INTRO.startswith(answer_line) and len(answer_line) < len(DEMO_INTRO)
        assert "tool call" not in text
        # Metrics are on in development, each on a port of its own printed at start-up.
        urls = re.findall(r"(?:runtime|gateway) (http://\S+/metrics)", before)
        assert len(urls) == 2
        with urllib.request.urlopen(urls[0], timeout=10) as scraped:
            assert b"stopline_runtime_stop_interrupted_seconds_count 1.0" in scraped.read()
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=20) == 0
        assert (tmp_path / ".stopline" / "runtime.db").exists()
    finally:
        if dev.poll() is None:
            dev.kill()
