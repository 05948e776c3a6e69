"""The `stopline` client commands as a user runs them: real processes for the runtime, the
gateway and each command, with signals sent the way a terminal sends Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.transport import open_sync_channel
from stopline.v1 import operation_pb2 as op_pb
from stopline_cli.client import start_request
from tests.credentials import ENV, TOKEN
from tests.processes import GatewayProcess, RuntimeProcess, free_port, stopline_command

LONG_TICKER = json.dumps({"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 0.2})


class Services:
    def __init__(self, runtime: RuntimeProcess, gateway: GatewayProcess, workdir: Path) -> None:
        self.runtime = runtime
        self.gateway = gateway
        self.workdir = workdir
        self.env = {**os.environ, **ENV, "STOPLINE_GATEWAY_ADDRESS": gateway.address}

    def get(self, operation_id: str) -> op_pb.Operation:
        """Straight to the gateway, for polling without the cost of a command per probe."""
        with open_sync_channel(self.gateway.address, TOKEN) as channel:
            stub = pb_grpc.GatewayServiceStub(channel)
            response = stub.GetOperation(
                pb.GetOperationRequest(operation_id=operation_id), timeout=5
            )
        return response.operation

    def wait_for(
        self, operation_id: str, done: Callable[[op_pb.Operation], bool], timeout: float = 10
    ) -> op_pb.Operation:
        deadline = time.monotonic() + timeout
        while True:
            operation = self.get(operation_id)
            if done(operation):
                return operation
            if time.monotonic() > deadline:
                raise AssertionError(f"operation never got there; last seen: {operation}")
            time.sleep(0.02)  # polling interval, not synchronisation: the loop checks state

    def command(self, *args: str) -> Command:
        return Command(list(args), self.env, self.workdir)

    def run(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*stopline_command(), *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.workdir,
            timeout=timeout,
        )


class Command:
    """A `stopline` command in the background whose output is read line by line with deadlines,
    so a test can act on what the command printed (and fail, not hang, if it never prints it)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [*stopline_command(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, wanted: str | Callable[[str], bool], timeout: float = 10) -> str:
        """Read up to the first line that matches; fail at the deadline or at end of output."""
        matches = wanted if callable(wanted) else lambda line: wanted in line
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {wanted!r} in {timeout}s: {self.lines}"
                ) from None
            if line is None:
                raise AssertionError(f"output ended without {wanted!r}: {self.lines}")
            self.lines.append(line)
            if matches(line):
                return line

    def finish(self, timeout: float = 10) -> tuple[int, str, str]:
        """Exit status, the whole stdout and stderr, once the command exits by itself."""
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        assert self.process.stderr is not None
        return code, "\n".join(self.lines), self.process.stderr.read()

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    workdir = tmp_path_factory.mktemp("cli")
    runtime = RuntimeProcess(f"sqlite:///{workdir / 'runtime.db'}", workdir)
    try:
        gateway = GatewayProcess(runtime.address, workdir)
        try:
            yield Services(runtime, gateway, workdir)
        finally:
            gateway.close()
    finally:
        runtime.close()


@pytest.fixture
def commands() -> Iterator[list[Command]]:
    """Background commands a test started; killed if the test failed before they exited."""
    started: list[Command] = []
    yield started
    for command in started:
        command.close()


def test_ctrl_c_stops_a_long_step_at_once_and_reports_the_halt(
    services: Services, commands: list[Command]
) -> None:
    run = services.command("run", "ticker", "--input", LONG_TICKER)
    commands.append(run)
    first = run.expect(lambda line: True)
    assert first.startswith("operation ")
    operation_id = first.split()[1]
    run.expect("step 0 tick 0")
    pressed = time.monotonic()
    run.interrupt()
    code, out, _ = run.finish(timeout=15)
    assert time.monotonic() - pressed < 15  # the step in flight had 30 s to go
    assert code == 130
    assert "stopping…" in out and "stop acknowledged by the gateway" in out
    assert out.index("stopping…") < out.index("INTERRUPTED mid-step 0, halted")
    assert run.lines[-1].startswith(f"operation {operation_id} INTERRUPTED: halted ")
    assert "ms from Ctrl-C to the final event" in run.lines[-1]
    assert services.get(operation_id).status == op_pb.OPERATION_STATUS_INTERRUPTED


def test_detach_then_attach_after_a_seq_and_stop_from_another_command(
    services: Services, commands: list[Command]
) -> None:
    detached = services.run("run", "ticker", "--input", LONG_TICKER, "--detach")
    assert detached.returncode == 0, detached.stderr
    operation_id = detached.stdout.strip()
    assert str(uuid.UUID(operation_id)) == operation_id  # the bare id, for $(...)
    services.wait_for(operation_id, lambda op: op.last_seq >= 5)  # still running unwatched

    attach = services.command("attach", operation_id, "--after", "3", "--json")
    commands.append(attach)
    attach.expect('"event"')
    stopped = services.run("stop", operation_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("stop delivered: ACCEPTED (")

    code, _, stderr = attach.finish()
    assert code == 130
    updates = [json.loads(line) for line in attach.lines]
    seqs = [int(update["event"]["seq"]) for update in updates if "event" in update]
    assert seqs == list(range(4, 4 + len(seqs)))  # only later events, no gap, no repeat
    assert any("stop_requested" in update for update in updates)  # the gateway's notice
    assert "interrupted" in updates[-1]["event"]
    assert "INTERRUPTED: halted" in stderr  # the human summary stays off stdout

    again = services.run("stop", operation_id)
    assert again.stdout.strip() == "stop delivered: ALREADY_REQUESTED (INTERRUPTED)"


def test_json_output_ls_and_show(services: Services) -> None:
    run = services.run("run", "echo", "--input", '{"word": "hello"}', "--json")
    assert run.returncode == 0, run.stderr
    updates = [json.loads(line) for line in run.stdout.splitlines()]
    operation_id = updates[0]["accepted"]["operation_id"]
    assert updates[-1]["event"]["completed"]["result"] == {"word": "hello"}

    # Independent reads, run side by side to keep the test quick.
    running = [
        services.command("show", operation_id, "--json"),
        services.command("show", operation_id),
        services.command("ls", "--status", "completed", "--json"),
        services.command("ls", "--limit", "1"),
    ]
    try:
        (_, show_json, _), (_, show_text, _), (_, listed, _), (_, newest, _) = [
            command.finish() for command in running
        ]
    finally:
        for command in running:
            command.close()
    assert json.loads(show_json)["status"] == "OPERATION_STATUS_COMPLETED"
    assert show_text.startswith(operation_id) and "COMPLETED" in show_text
    assert operation_id in [json.loads(line)["id"] for line in listed.splitlines()]
    assert newest == show_text


def test_json_output_keeps_integers_integers(services: Services) -> None:
    """google.protobuf.Struct carries doubles; `--json` (and the human line) still say 1."""
    sent = '{"a":1,"b":1.5,"c":[1,2.0],"d":{"e":-3}}'
    expected = '{"a": 1, "b": 1.5, "c": [1, 2], "d": {"e": -3}}'
    run = services.run("run", "echo", "--input", sent, "--json")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    completed = json.loads(lines[-1])["event"]["completed"]["result"]
    assert json.dumps(completed, sort_keys=True) == expected
    accepted = json.loads(lines[0])["accepted"]["operation"]["input"]
    assert json.dumps(accepted, sort_keys=True) == expected
    assert '"a": 1.0' not in run.stdout and '"e": -3.0' not in run.stdout
    human = services.run("run", "echo", "--input", sent)
    assert human.returncode == 0, human.stderr
    assert "COMPLETED: " in human.stdout and "1.0" not in human.stdout


def test_failures_exit_non_zero_with_the_grpc_code_on_stderr(services: Services) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    running = [
        services.command("show", "nope"),
        services.command("stop", "not-an-id"),
        services.command("attach", "nope", "--after", "2"),
        services.command("run", "no-such-agent"),
        services.command("ls", "--gateway", nobody),
    ]
    try:
        results = [command.finish() for command in running]
    finally:
        for command in running:
            command.close()
    for code, _, stderr in results[:3]:
        assert code == 1 and "INVALID_ARGUMENT: operation_id" in stderr
    assert results[3][0] == 1 and "INVALID_ARGUMENT: agent" in results[3][2]
    assert results[4][0] == 69 and "UNAVAILABLE" in results[4][2]


def test_a_second_ctrl_c_leaves_without_waiting(
    services: Services, commands: list[Command]
) -> None:
    run = services.command("run", "ticker", "--input", LONG_TICKER)
    commands.append(run)
    operation_id = run.expect(lambda line: True).split()[1]
    run.expect("step 0 tick 0")
    # A frozen runtime cannot record the stop, so only leaving can end the command now.
    services.runtime.process.send_signal(signal.SIGSTOP)
    try:
        run.interrupt()
        run.expect("stop acknowledged by the gateway")
        pressed = time.monotonic()
        run.interrupt()
        code, out, _ = run.finish(timeout=5)
        left_after = time.monotonic() - pressed
    finally:
        services.runtime.process.send_signal(signal.SIGCONT)
    assert code == 130
    assert left_after < 3
    assert "INTERRUPTED" not in out and "left without waiting" in out
    # The stop the gateway accepted is still delivered once the runtime is back.
    services.wait_for(
        operation_id, lambda op: op.status == op_pb.OPERATION_STATUS_INTERRUPTED, timeout=15
    )


def test_attach_after_the_last_event_of_a_finished_operation_ends_at_once(
    services: Services,
) -> None:
    """Issue 11: nothing comes after the terminal event, so attach says how the operation ended
    and exits with its status, instead of waiting out the gateway's reconnect deadline (60 s)
    and exiting 69 with a hint to run the same command again."""
    run = services.run("run", "echo", "--input", '{"word": "hi"}', "--json")
    assert run.returncode == 0, run.stderr
    updates = [json.loads(line) for line in run.stdout.splitlines()]
    operation_id = updates[0]["accepted"]["operation_id"]
    last_seq = int(updates[-1]["event"]["seq"])
    attach = services.run("attach", operation_id, "--after", str(last_seq), timeout=20)
    assert attach.returncode == 0, attach.stderr
    assert attach.stdout.strip() == (
        f"operation {operation_id} COMPLETED; no events after seq {last_seq}"
    )


def test_run_passes_deadline_and_max_steps_and_show_and_ls_display_them(
    services: Services,
) -> None:
    ticker = json.dumps({"steps": 5, "step_seconds": 0})
    done = services.run(
        "run", "ticker", "--input", ticker, "--deadline", "600", "--max-steps", "2", "--json"
    )
    first = json.loads(done.stdout.splitlines()[0])
    operation_id = first["accepted"]["operation_id"]
    operation = services.wait_for(
        operation_id, lambda o: o.status != op_pb.OPERATION_STATUS_RUNNING
    )
    # The budget of 2 stopped a 5-step ticker; the deadline is the start plus 600 s.
    assert operation.max_steps == 2 and operation.steps_completed == 2
    assert operation.HasField("deadline_time")
    shown = services.run("show", operation_id)
    assert shown.returncode == 0, shown.stderr
    assert "max_steps=2" in shown.stdout and "deadline=" in shown.stdout
    listed = services.run("ls", "--limit", "50")
    line = next(line for line in listed.stdout.splitlines() if line.startswith(operation_id))
    assert "max_steps=2" in line and "deadline=" in line
    plain = services.run("run", "ticker", "--input", json.dumps({"steps": 1, "step_seconds": 0}))
    plain_id = plain.stdout.split()[1]
    assert "max_steps=" not in services.run("show", plain_id).stdout


def test_run_no_hold_streams_the_operation_to_its_end(services: Services) -> None:
    ticker = json.dumps({"steps": 2, "step_seconds": 0})
    done = services.run("run", "ticker", "--input", ticker, "--no-hold", "--json")
    assert done.returncode == 0, done.stderr
    updates = [json.loads(line) for line in done.stdout.splitlines()]
    assert "accepted" in updates[0]
    seqs = [int(u["event"]["seq"]) for u in updates[1:]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "completed" in updates[-1]["event"]
    assert start_request("ticker", {}, "k", None, None, False, no_hold=True).no_hold
    assert not start_request("ticker", {}, "k", None, None, False).no_hold


def test_stop_by_key_before_the_start_records_it_ahead(services: Services) -> None:
    key = f"cli-test-{uuid.uuid4()}"
    stopped = services.run("stop", "--key", key, "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["outcome"] == "INTERRUPT_OUTCOME_RECORDED_AHEAD"
    again = services.run("stop", "--key", key).stdout
    assert again.startswith("stop delivered: ALREADY_REQUESTED (no operation with this key yet")
    fresh = services.run("stop", "--key", f"cli-test-{uuid.uuid4()}").stdout
    assert "recorded ahead" in fresh
    run = services.run("run", "ticker", "--input", LONG_TICKER, "--idempotency-key", key)
    assert "tick 0" not in run.stdout and "INTERRUPTED before step 0" in run.stdout
    operation_id = run.stdout.split()[1]
    operation = services.get(operation_id)
    assert operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert operation.steps_completed == 0
    neither = services.run("stop")
    both = services.run("stop", operation_id, "--key", key)
    assert neither.returncode != 0 and both.returncode != 0
    assert "exactly one of OPERATION_ID and --key" in both.stderr
