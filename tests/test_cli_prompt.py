"""The prompt `stopline run` and `attach` show at a terminal when an operation asks for approval,
end to end: the command runs on a real pseudo-terminal (its controlling terminal, so Ctrl-C is the
terminal's), against a real gateway and runtime (SQLite) whose `llm` agent talks to a scripted
fake model that asks for `send({"to": "bob", "amount": 5})` and then answers "Done.". The test
types at the prompt like a person and reads what the command prints, with deadlines."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stopline.render import EXIT_INTERRUPTED
from stopline.v1 import operation_pb2 as op_pb
from tests.processes import GatewayProcess, RuntimeProcess, stopline_command
from tests.test_cli import Services
from tests.test_llm_e2e import USER

REPO = Path(__file__).resolve().parent.parent
ASKS: dict[str, Any] = {
    "kind": "tool_calls",
    "calls": [{"name": "send", "arguments": '{"to": "bob", "amount": 5}', "id": "call_send"}],
}
DONE: dict[str, Any] = {"kind": "text", "text": "Done."}
INPUT = json.dumps({"messages": [USER], "tools": ["send"]})
APPROVE = "approve? [y]es / [n]o / [e]dit the arguments: "
ASKED = 'WAITING for a person: approve send({"amount":5,"to":"bob"})'
# Runs the command with the pseudo-terminal (its stdin) as its controlling terminal: the child
# is a new session's leader (start_new_session), which may take a terminal with TIOCSCTTY.
CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A `stopline` command on a pseudo-terminal: `expect` waits (with a deadline) for text it
    prints, `type` sends keys as a person would (a line ends with Enter, `\\r`)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self._master, slave = os.openpty()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CONTROLLING_TTY, *stopline_command(), *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self.output = ""  # everything printed so far, newlines as "\n"
        self._seen = 0  # where the next `expect` starts looking

    def _read(self, timeout: float) -> bool:
        """Whatever arrives within `timeout`; False once the command's end closed the terminal."""
        ready, _, _ = select.select([self._master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: no process has the terminal open any more
            return False
        if not data:
            return False
        self.output += data.decode(errors="replace").replace("\r\n", "\n")
        return True

    def expect(self, text: str, timeout: float = 10) -> str:
        """Wait for `text` after what earlier calls matched; returns the output up to it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self._seen)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"never printed {text!r}; printed:\n{self.output}")
        before = self.output[self._seen : found]
        self._seen = found + len(text)
        return before

    def type(self, keys: str) -> None:
        os.write(self._master, keys.encode())

    def line(self, text: str) -> None:
        self.type(text + "\r")

    def wait(self, timeout: float = 15) -> int:
        """The exit status, once the command ends (reading what it prints until then)."""
        deadline = time.monotonic() + timeout
        while self._read(max(0.0, min(0.2, deadline - time.monotonic()))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
        while self._read(0):  # what is left in the terminal's buffer
            if self.process.poll() is not None and not select.select([self._master], [], [], 0)[0]:
                break
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self._master)


class Setup:
    def __init__(self, services: Services, model: str, send_log: Path) -> None:
        self.services = services
        self.model = model
        self.send_log = send_log

    def script(self, *turns: dict[str, Any]) -> None:
        """The model's next turns; forgets the requests it saw and the sends logged so far."""
        _post(self.model + "/_fake/script", list(turns))
        urllib.request.urlopen(
            urllib.request.Request(self.model + "/_fake/requests", method="DELETE"), timeout=10
        ).close()
        self.send_log.write_text("")

    def sends(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.send_log.read_text().splitlines()]

    def model_saw(self) -> list[dict[str, Any]]:
        """The messages of the model's last request."""
        with urllib.request.urlopen(self.model + "/_fake/requests", timeout=10) as answer:
            requests = json.load(answer)["requests"]
        messages: list[dict[str, Any]] = requests[-1]["messages"]
        return messages

    def terminal(self, *args: str) -> Terminal:
        return Terminal(list(args), self.services.env, self.services.workdir)


def _post(url: str, body: object) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("cli-prompt")
    command = [sys.executable, "-m", "fake_llm", "--port", "0", "--tokens-per-second", "0"]
    model = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert model.stdout is not None
        announced = model.stdout.readline()
        assert announced.startswith("fake_llm listening on "), announced
        base_url = announced.split()[-1]
        send_log = workdir / "sends.jsonl"
        env = {
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "STOPLINE_TEST_SEND_LOG": str(send_log),
        }
        args = (
            *("--llm-base-url", base_url),
            *("--tool", "send=tests.waiting_tools:SendTool"),
        )
        runtime = RuntimeProcess(
            f"sqlite:///{workdir / 'runtime.db'}", workdir, extra_args=args, env=env
        )
        try:
            gateway = GatewayProcess(runtime.address, workdir)
            try:
                services = Services(runtime, gateway, workdir)
                yield Setup(services, base_url.removesuffix("/v1"), send_log)
            finally:
                gateway.close()
        finally:
            runtime.close()
    finally:
        model.terminate()
        model.wait(timeout=10)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def run_at_a_terminal(setup: Setup, terminals: list[Terminal]) -> Terminal:
    terminal = setup.terminal("run", "llm", "--input", INPUT)
    terminals.append(terminal)
    terminal.expect(ASKED)
    terminal.expect(APPROVE)
    return terminal


def test_approve_at_the_prompt_runs_the_tool_once_and_the_run_completes(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    assert setup.sends() == []  # nothing runs before the person says so
    terminal.line("y")
    terminal.expect("approved by tester")  # the event, and the prompt's remark (either first):
    terminal.expect('tool call call_send: send({"amount":5,"to":"bob"})')
    terminal.expect('tool call call_send finished: {"sent":5,"to":"bob"}')
    terminal.expect("Done.")
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert terminal.output.count("answer ACCEPTED: approved\n") == 1, terminal.output
    assert f"{APPROVE}y\n" in terminal.output  # the person's answer, echoed on the prompt's line
    assert setup.sends() == [{"to": "bob", "amount": 5}]
    assert "Traceback" not in terminal.output


def test_edited_arguments_at_the_prompt_are_the_ones_the_tool_receives(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    terminal.line("e")
    terminal.expect("arguments (a JSON object): ")
    terminal.line("[3]")  # not an object: asked again
    terminal.expect("not a JSON object; arguments: ")
    terminal.line('{"to": "bob", "amount": 3}')
    terminal.expect('approved with arguments {"amount":3,"to":"bob"} by tester')
    terminal.expect('tool call call_send finished: {"sent":3,"to":"bob"}')
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert 'answer ACCEPTED: approved with arguments {"amount":3,"to":"bob"}' in terminal.output
    assert setup.sends() == [{"to": "bob", "amount": 3}]


def test_an_answer_the_schema_refuses_is_asked_again(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    terminal.line("e")
    terminal.expect("arguments (a JSON object): ")
    terminal.line('{"to": "bob", "amount": 0}')  # the tool's schema wants at least 1
    terminal.expect("answer refused: INVALID_ARGUMENT")
    terminal.expect(APPROVE)
    terminal.line("y")
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert setup.sends() == [{"to": "bob", "amount": 5}]


def test_reject_with_a_reason_the_tool_does_not_run_and_the_model_is_told(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    terminal.line("what?")
    terminal.expect("please type y, n or e: ")
    terminal.line("n")
    terminal.expect("reason: ")
    terminal.line("bob has enough")
    terminal.expect("rejected (bob has enough) by tester")
    terminal.expect("tool call call_send FAILED: a person rejected this tool call: bob has enough")
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert "answer ACCEPTED: rejected (bob has enough)" in terminal.output
    assert setup.sends() == []
    told = [m for m in setup.model_saw() if m.get("role") == "tool"]
    assert len(told) == 1 and "bob has enough" in told[0]["content"], told


def test_attach_at_a_terminal_to_a_waiting_operation_prompts_and_answers_there(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    started = setup.services.run("run", "llm", "--input", INPUT, "--detach")
    assert started.returncode == 0, started.stderr
    op_id = started.stdout.strip()
    setup.services.wait_for(op_id, lambda o: o.status == op_pb.OPERATION_STATUS_WAITING)
    terminal = setup.terminal("attach", op_id)
    terminals.append(terminal)
    terminal.expect(ASKED)
    terminal.expect(APPROVE)
    terminal.line("y")
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert setup.sends() == [{"to": "bob", "amount": 5}]


def test_a_request_answered_elsewhere_drops_the_prompt_and_the_next_one_reads_the_next_line(
    setup: Setup, terminals: list[Terminal]
) -> None:
    """The person's next line belongs to the prompt on the screen, not to one dropped earlier."""
    setup.script(ASKS, ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    waiting = setup.services.get(_operation_id(terminal))
    answered = setup.services.run("answer", waiting.id, "--args", '{"to": "bob", "amount": 2}')
    assert answered.returncode == 0, answered
    terminal.expect("approved with arguments")  # the stream shows it; the prompt is dropped
    assert f"{APPROVE}\n[" in terminal.output  # on a line of its own, not after the question
    terminal.expect(ASKED)  # the model asks again
    terminal.expect(APPROVE)
    terminal.line("y")
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert setup.sends() == [{"to": "bob", "amount": 2}, {"to": "bob", "amount": 5}]


def test_ctrl_c_at_the_prompt_stops_the_operation_and_the_command_exits(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    terminal.type("\x03")  # the terminal's interrupt key: SIGINT to the command
    terminal.expect("\nstopping…")  # on a line of its own, after the question's
    terminal.expect("INTERRUPTED")
    assert terminal.wait() == EXIT_INTERRUPTED, terminal.output
    assert setup.sends() == []
    assert APPROVE not in terminal.output.split("stopping…")[1], terminal.output  # not asked again
    assert "Traceback" not in terminal.output and "Fatal" not in terminal.output, terminal.output


def test_end_of_input_at_the_prompt_leaves_the_answer_to_a_script(
    setup: Setup, terminals: list[Terminal]
) -> None:
    setup.script(ASKS, DONE)
    terminal = run_at_a_terminal(setup, terminals)
    terminal.type("\x04")  # Ctrl-D: the person will not answer here
    terminal.expect("\nno answer given here; answer with: stopline answer ")
    answered = setup.services.run("answer", _operation_id(terminal), "--approve")
    assert answered.returncode == 0, answered
    terminal.expect('COMPLETED: "Done."')
    assert terminal.wait() == 0, terminal.output
    assert setup.sends() == [{"to": "bob", "amount": 5}]


def _operation_id(terminal: Terminal) -> str:
    """The id the stream's first line names ("operation <id>")."""
    first = terminal.output.splitlines()[0].split()
    assert first[0] == "operation", terminal.output
    return first[1]
