"""kill -9 of the runtime in the middle of a tool call, with real processes: on SQLite the
runtime is restarted, on PostgreSQL another replica takes the operation over. Either way the
call the dead process left open is settled `tool_call_outcome_unknown` before the step runs
again, and every call in the log has exactly one ending."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from sqlalchemy import create_engine, select

from runtime_service.schema import events
from runtime_service.storage.shared import OUTCOME_UNKNOWN_REASON
from stopline.events import TOOL_CALL_ENDINGS
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import runtime_sync_channel
from tests.processes import RuntimeProcess, ServiceProcess, owner_of
from tests.test_replicas import assert_gap_free
from tests.test_tool_calls import pid_gone

REPO = Path(__file__).resolve().parent.parent
# Short leases, the test agent and a tool given with --tool (importable through PYTHONPATH).
ARGS = (
    "--lease-seconds",
    "1",
    "--poll-seconds",
    "0.1",
    "--agent",
    "tools=tests.tool_agents:ToolAgent",
    "--tool",
    "wait=tests.tool_agents:WaitTool",
)
ENV = {"PYTHONPATH": str(REPO)}


def stored_events(url: str, op_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(events.c.seq, events.c.kind, events.c.data_json)
                .where(events.c.operation_id == op_id)
                .order_by(events.c.seq)
            ).all()
    finally:
        engine.dispose()
    return [(seq, kind, json.loads(data)) for seq, kind, data in rows]


def wait_for_log(
    url: str, op_id: str, done: Any, timeout: float = 60
) -> list[tuple[int, str, dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while True:
        log = stored_events(url, op_id)
        if done([kind for _, kind, _ in log]):
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"the log never got there: {[k for _, k, _ in log]}")
        time.sleep(0.05)  # polling interval, not synchronisation: the loop checks the log


def test_runtime_killed_mid_tool_call_settles_it_outcome_unknown_before_the_rerun(
    db_url: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    postgres = db_url.startswith("postgresql")
    first = RuntimeProcess(db_url, tmp_path, extra_args=ARGS, env=ENV)
    processes.append(first)
    if postgres:  # a second replica, there all along, takes over once the lease lapses
        processes.append(RuntimeProcess(db_url, tmp_path, extra_args=ARGS, env=ENV))
    value = struct_pb2.Struct()
    value.update({"calls": [{"name": "wait"}]})
    with runtime_sync_channel(first.address) as channel:
        started = rt_grpc.RuntimeServiceStub(channel).StartOperation(
            rt_pb.StartOperationRequest(agent="tools", input=value), timeout=10
        )
    op_id = started.operation.id
    wait_for_log(db_url, op_id, lambda kinds: "output_chunk" in kinds)  # the tool is waiting
    owner = owner_of(processes, db_url, op_id)  # the other replica may have claimed it first
    owner.kill()
    other: ServiceProcess
    if postgres:
        other = next(process for process in processes if process is not owner)
    else:
        other = RuntimeProcess(db_url, tmp_path, port=owner.port, extra_args=ARGS, env=ENV)
        processes.append(other)
    # The step reruns (a second call starts and waits), then a stop ends it.
    wait_for_log(db_url, op_id, lambda kinds: kinds.count("output_chunk") == 2)
    with runtime_sync_channel(other.address) as channel:
        rt_grpc.RuntimeServiceStub(channel).InterruptOperation(
            rt_pb.InterruptOperationRequest(operation_id=op_id, reason="done"), timeout=10
        )
    log = wait_for_log(db_url, op_id, lambda kinds: kinds[-1] == "interrupted")
    kinds = [kind for _, kind, _ in log]
    step_starts = [seq for seq, kind, _ in log if kind == "step_started"]
    assert len(step_starts) == 2, kinds
    calls: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    for seq, kind, data in log:
        if kind == "tool_call_started" or kind in TOOL_CALL_ENDINGS:
            calls.setdefault(data["call_id"], []).append((seq, kind, data))
    assert len(calls) == 2, kinds
    (lost, rerun) = calls.values()
    assert [kind for _, kind, _ in lost] == ["tool_call_started", "tool_call_outcome_unknown"]
    assert [kind for _, kind, _ in rerun] == ["tool_call_started", "tool_call_cancelled"]
    settled_seq, _, settled = lost[1]
    assert settled_seq < step_starts[1], "settled after the step ran again"
    assert settled["reason"] == OUTCOME_UNKNOWN_REASON and settled["step"] == 0
    assert kinds.index("stop_requested") < rerun[1][0] - 1 < kinds.index("interrupted")
    assert_gap_free(db_url)


def test_a_blocking_call_does_not_outlive_a_runtime_killed_with_minus_9(
    sqlite_url: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    runtime = RuntimeProcess(sqlite_url, tmp_path, extra_args=ARGS, env=ENV)
    processes.append(runtime)
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n"
    value = struct_pb2.Struct()
    value.update({"calls": [{"name": "python", "arguments": {"code": code}}]})
    with runtime_sync_channel(runtime.address) as channel:
        started = rt_grpc.RuntimeServiceStub(channel).StartOperation(
            rt_pb.StartOperationRequest(agent="tools", input=value), timeout=10
        )
    log = wait_for_log(sqlite_url, started.operation.id, lambda kinds: "output_chunk" in kinds)
    pid = int(next(data["text"] for _, kind, data in log if kind == "output_chunk"))
    runtime.kill()
    deadline = time.monotonic() + 20
    while not pid_gone(pid):
        assert time.monotonic() < deadline, f"worker {pid} outlived its runtime"
        time.sleep(0.05)  # polling interval, not synchronisation: the loop checks the process
