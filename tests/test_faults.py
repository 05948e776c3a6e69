"""Faults with real processes on loopback: a gateway SIGKILLed mid-stream, the runtime SIGKILLed
and restarted under a stream and around a stop, the SQLite file locked by another process, and
PostgreSQL restarted under a stream through the gateway.

No sleeps as synchronisation: every wait is a read of the next stream message (with a deadline
on the call) or a poll with a deadline. What each test checks in the end is the durable record:
every operation terminal, its event sequence gap-free, and the client's view equal to it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import create_engine, select

from runtime_service.schema import steps
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import PRINCIPAL, gateway_sync_channel, runtime_sync_channel
from tests.pg_cluster import private_postgres, require_private_postgres
from tests.processes import GatewayProcess, RuntimeProcess, ServiceProcess
from tests.test_replicas import assert_gap_free

# Short leases: a SIGKILLed runtime's operations are taken over by its successor within a second.
RUNTIME_ARGS = ("--lease-seconds", "1", "--poll-seconds", "0.1")
TERMINAL = ("completed", "failed", "interrupted")
CALL_DEADLINE = 60.0


def ticker(**settings: float) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(settings)
    return value


def start_stream(stub: pb_grpc.GatewayServiceStub, policy: int, **settings: float) -> Any:
    request = pb.StartAndStreamRequest(agent="ticker", cancel_policy=policy)  # type: ignore[arg-type]
    request.input.CopyFrom(ticker(**settings))
    return stub.StartAndStream(request, timeout=CALL_DEADLINE)


def event_kind(update: Any) -> str | None:
    if update.WhichOneof("update") != "event":
        return None
    kind: str = update.event.WhichOneof("kind")
    return kind


def read_until(call: Any, predicate: Callable[[Any], bool]) -> list[Any]:
    seen: list[Any] = []
    for update in call:
        seen.append(update)
        if predicate(update):
            return seen
    raise AssertionError("the stream ended before the expected message")


def read_to_end(call: Any) -> tuple[list[Any], grpc.RpcError | None]:
    """Everything the stream still delivers, and the error that ended it (None: it ended OK)."""
    seen: list[Any] = []
    try:
        for update in call:
            seen.append(update)
    except grpc.RpcError as exc:
        return seen, exc
    return seen, None


def seqs(updates: list[Any]) -> list[int]:
    return [u.event.seq for u in updates if u.WhichOneof("update") == "event"]


def get(stub: rt_grpc.RuntimeServiceStub, op_id: str) -> op_pb.Operation:
    return stub.GetOperation(rt_pb.GetOperationRequest(operation_id=op_id), timeout=10).operation


def wait_terminal(address: str, op_ids: list[str], deadline: float = 60) -> dict[str, int]:
    """Poll until every operation has ended; UNAVAILABLE (the runtime or its database is still
    coming back) just means poll again."""
    end = time.monotonic() + deadline
    statuses: dict[str, int] = {}
    terminal = {
        op_pb.OPERATION_STATUS_COMPLETED,
        op_pb.OPERATION_STATUS_FAILED,
        op_pb.OPERATION_STATUS_INTERRUPTED,
    }
    with runtime_sync_channel(address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        while len(statuses) < len(op_ids):
            for op_id in op_ids:
                if op_id in statuses:
                    continue
                try:
                    status = get(stub, op_id).status
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    break
                if status in terminal:
                    statuses[op_id] = status
            assert time.monotonic() < end, f"not all of {op_ids} ended within {deadline}s"
            time.sleep(0.05)  # poll interval, not synchronisation
    return statuses


# ------------------------------------------------------------------------ the gateway dies


def test_gateway_killed_mid_stream_client_resumes_through_another(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    runtime = RuntimeProcess(url, tmp_path, extra_args=RUNTIME_ARGS)
    processes.append(runtime)
    doomed = GatewayProcess(runtime.address, tmp_path)
    processes.append(doomed)
    spare = GatewayProcess(runtime.address, tmp_path)
    processes.append(spare)
    with gateway_sync_channel(doomed.address) as channel:
        # The stop policy cannot be applied by a gateway that was SIGKILLed: the operation runs on.
        call = start_stream(
            pb_grpc.GatewayServiceStub(channel),
            pb.CANCEL_POLICY_STOP,
            steps=3,
            step_seconds=0.6,
            chunk_interval_seconds=0.1,
        )
        seen = read_until(call, lambda u: event_kind(u) == "step_completed")
        op_id = seen[0].accepted.operation_id
        doomed.kill()
        more, error = read_to_end(call)  # whatever was already on its way, then the break
        seen += more
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    last = seqs(seen)[-1]
    with gateway_sync_channel(spare.address) as channel:
        resumed = pb_grpc.GatewayServiceStub(channel).StreamOperation(
            pb.StreamOperationRequest(operation_id=op_id, after_seq=last), timeout=CALL_DEADLINE
        )
        rest, error = read_to_end(resumed)
    assert error is None
    got = seqs(seen) + seqs(rest)
    assert got == list(range(1, len(got) + 1)), f"gap or duplicate: {got}"
    assert event_kind(rest[-1]) == "completed"
    assert_gap_free(url)


# ------------------------------------------------------------------------ the runtime dies


def test_runtime_killed_and_restarted_under_a_gateway_stream_loses_nothing(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    runtime = RuntimeProcess(url, tmp_path, extra_args=RUNTIME_ARGS)
    processes.append(runtime)
    gateway = GatewayProcess(runtime.address, tmp_path)
    processes.append(gateway)
    with gateway_sync_channel(gateway.address) as channel:
        call = start_stream(
            pb_grpc.GatewayServiceStub(channel),
            pb.CANCEL_POLICY_STOP,
            steps=4,
            step_seconds=0.5,
            chunk_interval_seconds=0.1,
        )
        seen = read_until(
            call, lambda u: event_kind(u) == "step_started" and u.event.step_started.step == 1
        )
        runtime.kill()  # mid-step 1; step 0 is checkpointed
        restarted = RuntimeProcess(url, tmp_path, port=runtime.port, extra_args=RUNTIME_ARGS)
        processes.append(restarted)
        rest, error = read_to_end(call)  # the same client call, never broken
    assert error is None, error
    updates = seen + rest
    got = seqs(updates)
    assert got == list(range(1, len(got) + 1)), f"gap or duplicate: {got}"
    assert event_kind(updates[-1]) == "completed"
    resumed = [u.event.started for u in updates if event_kind(u) == "started"]
    assert [s.resumed for s in resumed] == [False, True] and resumed[1].from_step == 1
    assert_gap_free(url)


def test_stop_sent_while_the_runtime_is_dead_lands_when_it_restarts(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    runtime = RuntimeProcess(url, tmp_path, extra_args=RUNTIME_ARGS)
    processes.append(runtime)
    gateway = GatewayProcess(runtime.address, tmp_path, extra_args=("--stop-ack-timeout", "0.2"))
    processes.append(gateway)
    with gateway_sync_channel(gateway.address) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        call = start_stream(stub, pb.CANCEL_POLICY_KEEP_RUNNING, steps=3, step_seconds=30)
        seen = read_until(call, lambda u: event_kind(u) == "output_chunk")
        op_id = seen[0].accepted.operation_id
        runtime.kill()
        answer = stub.StopOperation(pb.StopOperationRequest(operation_id=op_id), timeout=10)
        assert answer.delivery == pb.STOP_DELIVERY_PENDING  # acknowledged, not yet delivered
        restarted = RuntimeProcess(url, tmp_path, port=runtime.port, extra_args=RUNTIME_ARGS)
        processes.append(restarted)
        rest, error = read_to_end(call)
    assert error is None, error
    assert rest[0].WhichOneof("update") == "stop_requested"  # the gateway's notice comes first
    assert event_kind(rest[-1]) == "interrupted"
    got = seqs(seen + rest)
    assert got == list(range(1, len(got) + 1)), f"gap or duplicate: {got}"
    with runtime_sync_channel(restarted.address) as channel:
        operation = get(rt_grpc.RuntimeServiceStub(channel), op_id)
    assert operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert operation.stop_request.requested_by.startswith(f"{PRINCIPAL} (client ")
    assert_gap_free(url)


def test_stop_recorded_just_before_the_runtime_dies_still_ends_the_operation(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    # At-boundary mode: the stop is recorded but the step runs on, so the kill really lands
    # between "stop accepted" and "operation ended".
    runtime = RuntimeProcess(url, tmp_path, extra_args=(*RUNTIME_ARGS, "--stop-at-boundary"))
    processes.append(runtime)
    gateway = GatewayProcess(runtime.address, tmp_path)
    processes.append(gateway)
    with gateway_sync_channel(gateway.address) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        call = start_stream(stub, pb.CANCEL_POLICY_KEEP_RUNNING, steps=3, step_seconds=30)
        seen = read_until(call, lambda u: event_kind(u) == "output_chunk")
        op_id = seen[0].accepted.operation_id
        answer = stub.StopOperation(pb.StopOperationRequest(operation_id=op_id), timeout=10)
        assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
        assert answer.operation.status == op_pb.OPERATION_STATUS_STOPPING
        runtime.kill()
        restarted = RuntimeProcess(url, tmp_path, port=runtime.port, extra_args=RUNTIME_ARGS)
        processes.append(restarted)
        rest, error = read_to_end(call)
    assert error is None, error
    assert event_kind(rest[-1]) == "interrupted"
    # Step 0 was in flight when the process died: the halt says the stop cut it there.
    halted = rest[-1].event.interrupted
    assert halted.mid_step and halted.step == 0
    kinds = [event_kind(u) for u in seen + rest]
    assert kinds.count("step_started") == 1  # the stop won: no step ran after the restart
    got = seqs(seen + rest)
    assert got == list(range(1, len(got) + 1)), f"gap or duplicate: {got}"
    assert_gap_free(url)
    # The dead process's attempt was settled by the restarted one, not left open forever.
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            records = conn.execute(
                select(steps).where(steps.c.operation_id == op_id).order_by(steps.c.attempt)
            ).all()
    finally:
        engine.dispose()
    assert [(r.step, r.attempt, r.outcome) for r in records] == [(0, 1, "abandoned")]
    assert records[0].finished_at is not None


# ------------------------------------------------------------------------ the database goes away

LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def test_sqlite_locked_by_another_process_answers_unavailable_then_recovers(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    path = tmp_path / "runtime.db"
    url = f"sqlite:///{path}"
    runtime = RuntimeProcess(url, tmp_path, extra_args=(*RUNTIME_ARGS, "--db-busy-timeout", "0.3"))
    processes.append(runtime)
    gateway = GatewayProcess(runtime.address, tmp_path)
    processes.append(gateway)
    with (
        runtime_sync_channel(runtime.address) as rt_channel,
        gateway_sync_channel(gateway.address) as gw_channel,
    ):
        stub = rt_grpc.RuntimeServiceStub(rt_channel)
        settings = {"steps": 4, "step_seconds": 0.3, "chunk_interval_seconds": 0.05}
        op_ids = [
            stub.StartOperation(
                rt_pb.StartOperationRequest(agent="ticker", input=ticker(**settings)), timeout=10
            ).operation.id
            for _ in range(4)
        ]
        call = start_stream(
            pb_grpc.GatewayServiceStub(gw_channel), pb.CANCEL_POLICY_STOP, **settings
        )
        seen = read_until(call, lambda u: event_kind(u) == "output_chunk")
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
            began = time.monotonic()
            codes = set()
            for request in (
                lambda: stub.StartOperation(rt_pb.StartOperationRequest(agent="echo"), timeout=20),
                lambda: stub.InterruptOperation(
                    rt_pb.InterruptOperationRequest(operation_id=op_ids[0]), timeout=20
                ),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    request()
                codes.add(err.value.code())
                assert "database is unavailable" in (err.value.details() or "")
            assert codes == {grpc.StatusCode.UNAVAILABLE}
            assert time.monotonic() - began < 15, "a locked database made the calls hang"
            # A read may pass (WAL readers are not blocked) or queue behind a failing write.
            assert read_code(stub, op_ids[1]) in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
        finally:
            assert locker.stdin is not None
            locker.stdin.write("\n")
            locker.stdin.flush()
            assert locker.wait(timeout=10) == 0
        rest, error = read_to_end(call)
        statuses = wait_terminal(runtime.address, op_ids)
    assert error is None, error
    assert event_kind(rest[-1]) == "completed"
    got = seqs(seen + rest)
    assert got == list(range(1, len(got) + 1)), f"gap or duplicate: {got}"
    # The stop answered UNAVAILABLE was never recorded: every operation completed, all steps.
    assert set(statuses.values()) == {op_pb.OPERATION_STATUS_COMPLETED}
    assert_gap_free(url)


def read_code(stub: rt_grpc.RuntimeServiceStub, op_id: str) -> grpc.StatusCode:
    try:
        get(stub, op_id)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


@pytest.mark.postgres
def test_postgres_restart_under_a_gateway_stream_loses_nothing(
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    require_private_postgres()
    with private_postgres() as pg:
        url = pg.create_database("stopline")
        runtime = RuntimeProcess(url, tmp_path, extra_args=("--lease-seconds", "1.5"))
        processes.append(runtime)
        gateway = GatewayProcess(runtime.address, tmp_path)
        processes.append(gateway)
        with gateway_sync_channel(gateway.address) as channel:
            call = start_stream(
                pb_grpc.GatewayServiceStub(channel),
                pb.CANCEL_POLICY_STOP,
                steps=4,
                step_seconds=0.5,
                chunk_interval_seconds=0.1,
            )
            seen = read_until(call, lambda u: event_kind(u) == "step_completed")
            pg.restart()
            rest, error = read_to_end(call)
        assert error is None, error
        got = seqs(seen + rest)
        assert got == list(range(1, len(got) + 1)), f"gap or duplicate: {got}"
        assert event_kind(rest[-1]) == "completed"
        assert_gap_free(url)
        runtime.close()
        gateway.close()
