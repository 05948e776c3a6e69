"""`stopline answer`, `pause`, `resume` and `ls --status waiting` against real processes (a
runtime on SQLite and a gateway), and the terminal prompt's reading of a person's replies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stopline.json_values import value_to_python
from stopline.v1 import operation_pb2 as op_pb
from stopline_cli.waiting import reply_for
from tests.credentials import OTHER_TOKEN
from tests.processes import GatewayProcess, RuntimeProcess
from tests.test_cli import Services

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    workdir = tmp_path_factory.mktemp("cli-waiting")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    agents = (
        *("--agent", "asker=tests.test_waiting:AskerAgent"),
        *("--agent", "cut_once=tests.test_waiting:CutOnceAgent"),
    )
    runtime = RuntimeProcess(
        f"sqlite:///{workdir / 'runtime.db'}", workdir, extra_args=agents, env=env
    )
    try:
        gateway = GatewayProcess(runtime.address, workdir)
        try:
            yield Services(runtime, gateway, workdir)
        finally:
            gateway.close()
    finally:
        runtime.close()


def started(services: Services, agent: str) -> str:
    done = services.run("run", agent, "--detach")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_answer_a_waiting_operation_from_a_script(services: Services) -> None:
    op_id = started(services, "asker")
    waiting = services.wait_for(op_id, lambda o: o.status == op_pb.OPERATION_STATUS_WAITING)
    listed = services.run("ls", "--status", "waiting")
    assert op_id in listed.stdout, listed

    # Another principal cannot answer it (nor learn that it exists).
    foreign = services.run("answer", op_id, "--value", '{"colour": "blue"}', "--token", OTHER_TOKEN)
    assert foreign.returncode != 0 and "NOT_FOUND" in foreign.stderr, foreign

    bad = services.run("answer", op_id, "--value", '{"colour": 7}')
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr, bad
    assert "answer.value.colour" in bad.stderr

    red = ("answer", op_id, waiting.input_request_id, "--value", '{"colour": "red"}')
    first = services.run(*red, "--answer-id", "x1")
    assert first.returncode == 0 and "answer ACCEPTED" in first.stdout, first
    again = services.run(*red, "--answer-id", "x1")
    assert again.returncode == 0 and "answer ALREADY_ANSWERED" in again.stdout, again
    other = services.run("answer", op_id, "--value", '{"colour": "green"}', "--answer-id", "x2")
    assert other.returncode != 0 and "FAILED_PRECONDITION" in other.stderr, other
    assert '"x1" won' in other.stderr

    done = services.wait_for(op_id, lambda o: o.status == op_pb.OPERATION_STATUS_COMPLETED)
    shown = services.run("attach", op_id)
    assert "WAITING for a person: answer: Which colour?" in shown.stdout, shown.stdout
    assert 'answered {"colour":"red"} by tester' in shown.stdout
    assert value_to_python(done.result) == {"value": {"colour": "red"}, "expired": False}


def test_pause_and_resume_from_the_command_line(services: Services) -> None:
    op_id = started(services, "cut_once")
    services.wait_for(op_id, lambda o: o.status == op_pb.OPERATION_STATUS_RUNNING)
    paused = services.run("pause", op_id)
    assert paused.returncode == 0 and "pause ACCEPTED" in paused.stdout, paused
    services.wait_for(op_id, lambda o: o.status == op_pb.OPERATION_STATUS_PAUSED)
    assert "ALREADY_PAUSED" in services.run("pause", op_id).stdout
    resumed = services.run("resume", op_id)
    assert resumed.returncode == 0 and "resume ACCEPTED" in resumed.stdout, resumed
    services.wait_for(op_id, lambda o: o.status == op_pb.OPERATION_STATUS_COMPLETED)
    shown = services.run("attach", op_id)
    assert "PAUSED mid-step 0 by tester" in shown.stdout, shown.stdout
    assert "step 0 started (attempt 2)" in shown.stdout


def test_the_prompt_reads_approve_reject_and_edited_arguments() -> None:
    approval = op_pb.InputRequested(kind=op_pb.INPUT_KIND_APPROVAL, tool_name="send")
    assert isinstance(reply_for(approval, []), str)
    yes = reply_for(approval, ["y"])
    assert isinstance(yes, op_pb.InputAnswer) and yes.approval.approved
    assert reply_for(approval, ["n"]) == "reason: "
    no = reply_for(approval, ["n", "too much"])
    assert isinstance(no, op_pb.InputAnswer)
    assert not no.approval.approved and no.approval.reason == "too much"
    lines = ["e", "not json"]
    assert "not a JSON object" in str(reply_for(approval, lines)) and lines == ["e"]
    edited = reply_for(approval, ["e", '{"amount": 3}'])
    assert isinstance(edited, op_pb.InputAnswer)
    assert edited.approval.approved and edited.approval.arguments["amount"] == 3
    question = op_pb.InputRequested(kind=op_pb.INPUT_KIND_ANSWER, prompt="Colour?")
    text = reply_for(question, ["red"])
    assert isinstance(text, op_pb.InputAnswer) and text.value.string_value == "red"
