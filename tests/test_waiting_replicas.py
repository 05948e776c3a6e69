"""Waiting operations survive the runtime: real processes on PostgreSQL, the runtime that ran
them killed (kill -9) while they wait for approvals; another replica, started afterwards, finds
every one still WAITING with its request, and the answers sent to it resume them there. The tool
each one asked for runs exactly once."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import runtime_sync_channel
from tests.processes import RuntimeProcess, ServiceProcess, fake_llm_process
from tests.test_llm_e2e import USER

pytestmark = pytest.mark.postgres
OPERATIONS = 3
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_llm(tmp_path: Path) -> Iterator[str]:
    """A fake model in its own process, asking for `send` (set_script then makes it answer)."""
    asks = {
        "kind": "tool_calls",
        "calls": [{"name": "send", "arguments": '{"to": "bob", "amount": 5}', "id": "call_send"}],
    }
    script = [asks] * (OPERATIONS * 3)
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    with fake_llm_process(path) as base_url:
        yield base_url


def set_script(base_url: str, turns: list[dict[str, object]]) -> None:
    request = urllib.request.Request(
        base_url.removesuffix("/v1") + "/_fake/script",
        data=json.dumps(turns).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


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
            kinds = [
                [
                    (r.event.WhichOneof("kind"), str(r.event)[:300])
                    for r in stub.WatchOperation(rt_pb.WatchOperationRequest(operation_id=i))
                ]
                for i in op_ids
                if i in [o.id for o in found if o.status in (4, 5, 6)]
            ]
            raise AssertionError(f"not all {status}: {[o.status for o in found]} {kinds}")
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
        *("--lease-seconds", "5", "--poll-seconds", "0.1", "--llm-base-url", fake_llm),
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
    set_script(fake_llm, [{"kind": "text", "text": "Sent."}] * (OPERATIONS * 3))

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


def test_pause_sent_to_another_replica_cuts_the_step_where_it_runs(
    postgres_url: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    """The pause lands on the replica that did not run the operation: it reaches the runner the
    way a stop does; the resume, on that same other replica, reruns the cut step elsewhere or
    there, as a new attempt, and the operation completes."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = (
        *("--lease-seconds", "5", "--poll-seconds", "0.1"),
        *("--agent", "cut_once=tests.test_waiting:CutOnceAgent"),
    )
    runner = RuntimeProcess(postgres_url, tmp_path, extra_args=args, env=env)
    processes.append(runner)
    other = RuntimeProcess(postgres_url, tmp_path, extra_args=args, env=env)
    processes.append(other)
    with (
        runtime_sync_channel(runner.address) as first,
        runtime_sync_channel(other.address) as second,
    ):
        here, there = rt_grpc.RuntimeServiceStub(first), rt_grpc.RuntimeServiceStub(second)
        start = rt_pb.StartOperationRequest(agent="cut_once")
        start.input.update({"marker": str(tmp_path / "first-attempt")})
        op_id = here.StartOperation(start, timeout=10).operation.id
        for response in here.WatchOperation(rt_pb.WatchOperationRequest(operation_id=op_id)):
            if response.event.WhichOneof("kind") == "output_chunk":
                break  # the first attempt hangs in its step now
        paused = there.PauseOperation(
            rt_pb.PauseOperationRequest(operation_id=op_id, requested_by="ops"), timeout=10
        )
        assert paused.outcome == rt_pb.PAUSE_OUTCOME_ACCEPTED
        [operation] = poll(there, [op_id], op_pb.OPERATION_STATUS_PAUSED)
        assert not operation.pause_requested
        resumed = there.ResumeOperation(
            rt_pb.ResumeOperationRequest(operation_id=op_id, requested_by="ops"), timeout=10
        )
        assert resumed.outcome == rt_pb.RESUME_OUTCOME_ACCEPTED
        poll(there, [op_id], op_pb.OPERATION_STATUS_COMPLETED)
        events = [
            r.event for r in there.WatchOperation(rt_pb.WatchOperationRequest(operation_id=op_id))
        ]
    kinds = [e.WhichOneof("kind") for e in events]
    assert "interrupted" not in kinds
    [cut] = [e.paused for e in events if e.WhichOneof("kind") == "paused"]
    assert cut.mid_step and cut.step == 0
    attempts = [
        (e.step_started.step, e.step_started.attempt)
        for e in events
        if e.WhichOneof("kind") == "step_started"
    ]
    assert attempts == [(0, 1), (0, 2), (1, 1)]
