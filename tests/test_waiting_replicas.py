"""Waiting operations survive the runtime: real processes on PostgreSQL, the runtime that ran
them killed (kill -9) while they wait for approvals; another replica, started afterwards, finds
every one still WAITING with its request, and the answers sent to it resume them there. The tool
each one asked for runs exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import runtime_sync_channel
from tests.processes import RuntimeProcess, ServiceProcess
from tests.test_llm_e2e import USER

pytestmark = pytest.mark.postgres
OPERATIONS = 3
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_llm(tmp_path: Path) -> Iterator[str]:
    """A fake model in its own process: each operation's first turn asks for `send`, the
    second answers."""
    asks = {
        "kind": "tool_calls",
        "calls": [{"name": "send", "arguments": '{"to": "bob", "amount": 5}', "id": "call_send"}],
    }
    script = [asks] * OPERATIONS + [{"kind": "text", "text": "Sent."}] * OPERATIONS
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    command = [sys.executable, "-m", "fake_llm", "--port", "0", "--tokens-per-second", "0"]
    process = subprocess.Popen([*command, "--script", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("fake_llm listening on "), line
        yield line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.close()


def poll(stub: rt_grpc.RuntimeServiceStub, op_ids: list[str], status: int) -> list[op_pb.Operation]:
    deadline = time.monotonic() + 60
    while True:
        found = [
            stub.GetOperation(rt_pb.GetOperationRequest(operation_id=i), timeout=10).operation
            for i in op_ids
        ]
        if all(o.status == status for o in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not all {status}: {[o.status for o in found]}")
        time.sleep(0.05)  # polling interval, not synchronisation: the loop checks the state


def test_runtime_killed_while_operations_wait_answers_resume_them_elsewhere(
    postgres_url: str, tmp_path: Path, fake_llm: str, processes: list[ServiceProcess]
) -> None:
    send_log = tmp_path / "sends.jsonl"
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "STOPLINE_TEST_SEND_LOG": str(send_log),
    }
    args = (
        *("--lease-seconds", "1", "--poll-seconds", "0.1", "--llm-base-url", fake_llm),
        *("--tool", "send=tests.waiting_tools:SendTool"),
    )
    first = RuntimeProcess(postgres_url, tmp_path, extra_args=args, env=env)
    processes.append(first)
    value = struct_pb2.Struct()
    value.update({"messages": [USER], "tools": ["send"]})
    with runtime_sync_channel(first.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        op_ids: list[str] = []
        for _ in range(OPERATIONS):  # one at a time: each takes the next turn of the script
            start = rt_pb.StartOperationRequest(agent="llm", input=value)
            op_ids.append(stub.StartOperation(start, timeout=10).operation.id)
            poll(stub, op_ids[-1:], op_pb.OPERATION_STATUS_WAITING)
    first.kill()

    second = RuntimeProcess(postgres_url, tmp_path, extra_args=args, env=env)
    processes.append(second)
    with runtime_sync_channel(second.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        waiting = poll(stub, op_ids, op_pb.OPERATION_STATUS_WAITING)  # nothing lost
        for operation in waiting:
            assert operation.input_request_id
            answered = stub.AnswerInput(
                rt_pb.AnswerInputRequest(
                    operation_id=operation.id,
                    request_id=operation.input_request_id,
                    answer_id=f"ok-{operation.id}",
                    answer=op_pb.InputAnswer(approval=op_pb.Approval(approved=True)),
                    answered_by="alice",
                ),
                timeout=10,
            )
            assert answered.outcome == rt_pb.ANSWER_OUTCOME_ACCEPTED
            assert answered.answered.answer.approval.approved
        done = poll(stub, op_ids, op_pb.OPERATION_STATUS_COMPLETED)
        assert all(o.result.string_value == "Sent." for o in done)
        for op_id in op_ids:
            kinds = [
                r.event.WhichOneof("kind")
                for r in stub.WatchOperation(rt_pb.WatchOperationRequest(operation_id=op_id))
            ]
            assert kinds.count("input_requested") == 1 and kinds.count("input_answered") == 1
            assert kinds.count("tool_call_started") == 1 and kinds.count("tool_call_finished") == 1
    runs = [json.loads(line) for line in send_log.read_text().splitlines()]
    assert runs == [{"to": "bob", "amount": 5}] * OPERATIONS  # each ran once, after the restart
    assert first.process.returncode == -9
