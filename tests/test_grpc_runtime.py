"""RuntimeService end to end through a real in-process grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select

from runtime_service.schema import events as events_table
from runtime_service.schema import operations as operations_table
from runtime_service.schema import steps as steps_table
from runtime_service.server import RunningRuntime
from runtime_service.storage.shared import SharedStorage
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import GatedAgent
from tests.credentials import runtime_channel

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = rt_grpc.RuntimeServiceAsyncStub


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def start(
    stub: Stub, agent: str, input_value: dict[str, Any] | None = None, key: str = ""
) -> op_pb.Operation:
    response = await stub.StartOperation(
        pb.StartOperationRequest(agent=agent, input=struct(input_value or {}), idempotency_key=key)
    )
    return response.operation


async def watch(
    stub: Stub, op_id: str, after_seq: int = 0, batch: bool = False
) -> AsyncIterator[op_pb.Event]:
    call = stub.WatchOperation(
        pb.WatchOperationRequest(operation_id=op_id, after_seq=after_seq, batch=batch)
    )
    async for response in call:
        if batch:
            assert not response.HasField("event") and response.events
            for event in response.events:
                yield event
        else:
            assert not response.events
            yield response.event


async def all_events(
    stub: Stub, op_id: str, after_seq: int = 0, timeout: float = 20, batch: bool = False
) -> list[op_pb.Event]:
    async def run() -> list[op_pb.Event]:
        return [e async for e in watch(stub, op_id, after_seq, batch)]

    return await asyncio.wait_for(run(), timeout)


async def get(stub: Stub, op_id: str) -> op_pb.Operation:
    return (await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))).operation


async def interrupt(stub: Stub, op_id: str, by: str = "test") -> pb.InterruptOperationResponse:
    response: pb.InterruptOperationResponse = await stub.InterruptOperation(
        pb.InterruptOperationRequest(operation_id=op_id, requested_by=by, reason="test")
    )
    return response


# ------------------------------------------------------------------------ health and reflection


async def test_health_and_reflection_are_served(runtime: RunningRuntime) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    async with aio.insecure_channel(runtime.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "stopline.v1.RuntimeService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def reflect() -> list[str]:
        with grpc.insecure_channel(runtime.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            # The full contract is retrievable, so a generic client can call every RPC.
            database.FindFileContainingSymbol("stopline.v1.RuntimeService")
            return services

    services = await asyncio.to_thread(reflect)
    assert "stopline.v1.RuntimeService" in services
    assert "grpc.health.v1.Health" in services


async def test_graceful_shutdown_reports_not_serving(runtime: RunningRuntime) -> None:
    await runtime.health.enter_graceful_shutdown()
    async with aio.insecure_channel(runtime.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------------ running and stopping


async def test_thirty_second_step_stopped_after_first_chunk(stub: Stub) -> None:
    op = await start(stub, "ticker", {"steps": 2, "step_seconds": 30, "chunk_interval_seconds": 5})
    # Unheld and with no key: claimed here in its create's own write (test_start_claimed.py).
    assert op.status == op_pb.OPERATION_STATUS_RUNNING
    seen: list[op_pb.Event] = []
    loop = asyncio.get_running_loop()
    stop_sent_at = 0.0

    async def follow() -> None:
        nonlocal stop_sent_at
        async for event in watch(stub, op.id):
            seen.append(event)
            if event.WhichOneof("kind") == "output_chunk" and not stop_sent_at:
                stop_sent_at = loop.time()
                reply = await interrupt(stub, op.id)
                assert reply.outcome == pb.INTERRUPT_OUTCOME_ACCEPTED
                assert reply.operation.status in (
                    op_pb.OPERATION_STATUS_STOPPING,
                    op_pb.OPERATION_STATUS_INTERRUPTED,
                )

    await asyncio.wait_for(follow(), 20)
    halted_within = loop.time() - stop_sent_at
    final = seen[-1]
    assert final.WhichOneof("kind") == "interrupted"
    assert final.interrupted.mid_step and final.interrupted.step == 0
    assert halted_within < 10, "the stop waited for the 30-second step to end"
    assert final.interrupted.halt_ms < 10_000
    kinds = [e.WhichOneof("kind") for e in seen]
    assert kinds.count("output_chunk") >= 1 and "step_completed" not in kinds
    assert kinds[-2:] == ["stop_requested", "interrupted"]
    stored = await get(stub, op.id)
    assert stored.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert stored.stop_request.requested_by == "test"
    assert stored.last_seq == final.seq


async def test_repeated_stop_is_harmless_and_says_what_happened(
    stub: Stub, gated: GatedAgent
) -> None:
    op = await start(stub, "gated")
    first = await interrupt(stub, op.id, by="alice")
    second = await interrupt(stub, op.id, by="bob")
    assert first.outcome == pb.INTERRUPT_OUTCOME_ACCEPTED
    assert second.outcome == pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED
    events = await all_events(stub, op.id)
    assert events[-1].WhichOneof("kind") == "interrupted"
    third = await interrupt(stub, op.id, by="carol")
    assert third.outcome == pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED
    assert third.operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert third.operation.stop_request.requested_by == "alice"
    kinds = [e.WhichOneof("kind") for e in await all_events(stub, op.id)]
    assert kinds.count("stop_requested") == 1 and kinds.count("interrupted") == 1

    done = await start(stub, "echo", {"x": 1})
    await all_events(stub, done.id)
    before = await get(stub, done.id)
    late = await interrupt(stub, done.id)
    assert late.outcome == pb.INTERRUPT_OUTCOME_ALREADY_FINISHED
    assert late.operation.status == op_pb.OPERATION_STATUS_COMPLETED
    assert await get(stub, done.id) == before


async def test_stop_racing_last_step_completion_ends_in_one_agreed_status(
    stub: Stub, gated: GatedAgent
) -> None:
    """200 races between a stop and the last step's completion, with random ordering."""
    rng = random.Random(20261125)
    outcomes: dict[int, int] = {}

    async def trial() -> None:
        op = await start(stub, "gated")
        async for event in watch(stub, op.id):  # wait until the only step is in flight
            if event.WhichOneof("kind") == "output_chunk":
                break
        # The release spans a wider window than the stop's own delay: the stop also pays an
        # RPC, which on a loaded machine (CI's two workers) can take longer than 3 ms, and then
        # every stop arrived after the step had completed, so nothing raced.
        delay = rng.uniform(0, 0.02)

        async def finish_step() -> None:
            await asyncio.sleep(delay)
            gated.release(op.id)

        async def stop() -> pb.InterruptOperationResponse:
            await asyncio.sleep(rng.uniform(0, 0.003))
            return await interrupt(stub, op.id)

        _, reply = await asyncio.gather(finish_step(), stop())
        events = await all_events(stub, op.id)
        terminal = [
            e for e in events if e.WhichOneof("kind") in ("completed", "failed", "interrupted")
        ]
        assert len(terminal) == 1 and terminal[0] == events[-1]
        stored = await get(stub, op.id)
        ending = terminal[0].WhichOneof("kind")
        assert ending in ("completed", "interrupted")
        expected = (
            op_pb.OPERATION_STATUS_COMPLETED
            if ending == "completed"
            else op_pb.OPERATION_STATUS_INTERRUPTED
        )
        assert stored.status == expected
        if reply.outcome == pb.INTERRUPT_OUTCOME_ALREADY_FINISHED:
            assert expected == op_pb.OPERATION_STATUS_COMPLETED
        else:
            assert reply.outcome == pb.INTERRUPT_OUTCOME_ACCEPTED
            assert expected == op_pb.OPERATION_STATUS_INTERRUPTED
        outcomes[expected] = outcomes.get(expected, 0) + 1

    for _ in range(20):
        await asyncio.wait_for(asyncio.gather(*(trial() for _ in range(10))), 60)
    assert sum(outcomes.values()) == 200
    # The random ordering must really have produced both endings, or nothing raced.
    assert set(outcomes) == {op_pb.OPERATION_STATUS_COMPLETED, op_pb.OPERATION_STATUS_INTERRUPTED}


async def test_watch_from_any_seq_yields_exactly_the_later_events(stub: Stub) -> None:
    op = await start(
        stub, "ticker", {"steps": 3, "step_seconds": 0.3, "chunk_interval_seconds": 0.05}
    )
    live_tails: list[tuple[int, asyncio.Task[list[op_pb.Event]]]] = []
    full: list[op_pb.Event] = []
    async for event in watch(stub, op.id):
        full.append(event)
        if event.seq in (1, 4, 9, 15):  # join mid-run from the seq just seen
            for batch in (False, True):
                joined = asyncio.create_task(all_events(stub, op.id, event.seq, batch=batch))
                live_tails.append((event.seq, joined))
    n = full[-1].seq
    assert [e.seq for e in full] == list(range(1, n + 1))
    assert full[-1].WhichOneof("kind") == "completed"
    for k, task in live_tails:
        tail = await task
        assert [e.seq for e in tail] == list(range(k + 1, n + 1)), f"live watch after {k}"
        assert tail == full[k:]
    for k in range(n + 1):  # after the run: replay then end
        assert await all_events(stub, op.id, k) == full[k:], f"replay after {k}"
        assert await all_events(stub, op.id, k, batch=True) == full[k:], f"batched after {k}"


async def test_idempotent_start(stub: Stub) -> None:
    first = await stub.StartOperation(
        pb.StartOperationRequest(agent="echo", input=struct({"a": 1}), idempotency_key="k1")
    )
    again = await stub.StartOperation(
        pb.StartOperationRequest(agent="echo", input=struct({"a": 1}), idempotency_key="k1")
    )
    assert first.created and not again.created
    assert again.operation.id == first.operation.id
    with pytest.raises(aio.AioRpcError) as err:
        await stub.StartOperation(
            pb.StartOperationRequest(agent="echo", input=struct({"a": 2}), idempotency_key="k1")
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key" in (err.value.details() or "")


async def test_list_paginates_with_tokens_and_filters(stub: Stub) -> None:
    ids = [(await start(stub, "echo", {"i": i})).id for i in range(5)]
    for op_id in ids:
        await all_events(stub, op_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListOperations(pb.ListOperationsRequest(page_size=2, page_token=token))
        assert len(page.operations) <= 2
        seen += [o.id for o in page.operations]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    completed = await stub.ListOperations(
        pb.ListOperationsRequest(status=op_pb.OPERATION_STATUS_COMPLETED, page_size=100)
    )
    assert {o.id for o in completed.operations} == set(ids)
    assert all(o.status == op_pb.OPERATION_STATUS_COMPLETED for o in completed.operations)
    none = await stub.ListOperations(pb.ListOperationsRequest(status=op_pb.OPERATION_STATUS_FAILED))
    assert list(none.operations) == []
    first = await stub.ListOperations(pb.ListOperationsRequest(page_size=1))
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ListOperations(
            pb.ListOperationsRequest(
                status=op_pb.OPERATION_STATUS_FAILED, page_size=1, page_token=first.next_page_token
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (err.value.details() or "")


# ------------------------------------------------------------------------ malformed requests

UNKNOWN_ID = "3f2b1c4d-0000-4000-8000-000000000000"


def snapshot(runtime: RunningRuntime) -> list[list[Any]]:
    storage = runtime.app.storage
    assert isinstance(storage, SharedStorage)
    with storage.engine.connect() as conn:
        return [
            [tuple(row) for row in conn.execute(select(table).order_by(*table.primary_key.columns))]
            for table in (operations_table, events_table, steps_table)
        ]


async def _drain(call: Any) -> None:
    result = call()
    if hasattr(result, "__aiter__"):
        async for _ in result:
            pass
    else:
        await result


async def expect_error(call: Any, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await _drain(call)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in (err.value.details() or ""), err.value.details()


async def test_malformed_requests_get_status_codes_and_change_nothing(
    runtime: RunningRuntime, stub: Stub
) -> None:
    done = await start(stub, "echo", {"x": 1}, key="taken")
    await all_events(stub, done.id)
    before = snapshot(runtime)
    limit = runtime.app.config.max_input_bytes
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[Any, grpc.StatusCode, tuple[str, ...]]] = [
        (
            lambda: stub.StartOperation(pb.StartOperationRequest(agent="nope")),
            invalid,
            ("agent", "nope", "ticker"),
        ),
        (lambda: stub.StartOperation(pb.StartOperationRequest(agent="")), invalid, ("agent",)),
        (
            lambda: stub.StartOperation(
                pb.StartOperationRequest(agent="echo", input=struct({"blob": "x" * (limit + 10)}))
            ),
            invalid,
            ("input", str(limit)),
        ),
        (
            lambda: stub.StartOperation(
                pb.StartOperationRequest(agent="ticker", input=struct({"steps": -1}))
            ),
            invalid,
            ("input.steps",),
        ),
        (
            lambda: stub.StartOperation(
                pb.StartOperationRequest(agent="echo", idempotency_key="k" * 201)
            ),
            invalid,
            ("idempotency_key", "200"),
        ),
        (
            lambda: stub.StartOperation(
                pb.StartOperationRequest(
                    agent="ticker", input=struct({"x": 1}), idempotency_key="taken"
                )
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            ("taken",),
        ),
        (
            lambda: stub.GetOperation(pb.GetOperationRequest(operation_id="not-a-uuid")),
            invalid,
            ("operation_id",),
        ),
        (
            lambda: stub.GetOperation(pb.GetOperationRequest(operation_id="")),
            invalid,
            ("operation_id",),
        ),
        (
            lambda: stub.GetOperation(pb.GetOperationRequest(operation_id=UNKNOWN_ID)),
            grpc.StatusCode.NOT_FOUND,
            (UNKNOWN_ID,),
        ),
        (
            lambda: stub.InterruptOperation(
                pb.InterruptOperationRequest(operation_id="' OR 1=1 --")
            ),
            invalid,
            ("operation_id",),
        ),
        (
            lambda: stub.InterruptOperation(pb.InterruptOperationRequest(operation_id=UNKNOWN_ID)),
            grpc.StatusCode.NOT_FOUND,
            (),
        ),
        (
            lambda: stub.InterruptOperation(
                pb.InterruptOperationRequest(operation_id=done.id, reason="r" * 1001)
            ),
            invalid,
            ("reason",),
        ),
        (
            lambda: stub.ListOperations(pb.ListOperationsRequest(page_size=-1)),
            invalid,
            ("page_size",),
        ),
        (
            lambda: stub.ListOperations(pb.ListOperationsRequest(page_size=10_000)),
            invalid,
            ("page_size",),
        ),
        (
            lambda: stub.ListOperations(pb.ListOperationsRequest(page_token="garbage!")),
            invalid,
            ("page_token",),
        ),
        (lambda: stub.ListOperations(pb.ListOperationsRequest(status=99)), invalid, ("status",)),  # type: ignore[arg-type]
        (
            lambda: stub.WatchOperation(
                pb.WatchOperationRequest(operation_id=done.id, after_seq=-1)
            ),
            invalid,
            ("after_seq",),
        ),
        (
            lambda: stub.WatchOperation(
                pb.WatchOperationRequest(operation_id=done.id, after_seq=10_000)
            ),
            grpc.StatusCode.OUT_OF_RANGE,
            ("after_seq",),
        ),
        (
            lambda: stub.WatchOperation(pb.WatchOperationRequest(operation_id="zzz")),
            invalid,
            ("operation_id",),
        ),
        (
            lambda: stub.WatchOperation(pb.WatchOperationRequest(operation_id=UNKNOWN_ID)),
            grpc.StatusCode.NOT_FOUND,
            (),
        ),
    ]
    for call, code, fragments in cases:
        await expect_error(call, code, *fragments)
    assert snapshot(runtime) == before
    # Still healthy and serving after all of that.
    assert (await get(stub, done.id)).status == op_pb.OPERATION_STATUS_COMPLETED


async def test_stopping_is_reported_while_the_step_winds_down(
    stub: Stub, runtime: RunningRuntime
) -> None:
    op = await start(stub, "stubborn")
    async for event in watch(stub, op.id):
        if event.WhichOneof("kind") == "output_chunk":
            break
    reply = await interrupt(stub, op.id)
    assert reply.operation.status == op_pb.OPERATION_STATUS_STOPPING
    listed = await stub.ListOperations(
        pb.ListOperationsRequest(status=op_pb.OPERATION_STATUS_STOPPING)
    )
    assert [o.id for o in listed.operations] == [op.id]
    events = await all_events(stub, op.id)
    assert events[-1].WhichOneof("kind") == "interrupted"


async def test_second_runtime_on_a_taken_port_refuses_to_start(
    runtime: RunningRuntime, tmp_path: Any
) -> None:
    from runtime_service.server import start_runtime
    from tests.agents import registry
    from tests.conftest import runtime_config

    config = runtime_config(f"sqlite:///{tmp_path / 'other.db'}", address=runtime.address)
    with pytest.raises(OSError, match="cannot listen"):
        await start_runtime(config, registry())


async def test_shutdown_ends_watches_with_a_reconnect_hint(tmp_path: Any) -> None:
    from runtime_service.server import start_runtime
    from tests.agents import registry
    from tests.conftest import runtime_config

    running = await start_runtime(runtime_config(f"sqlite:///{tmp_path / 'rt.db'}"), registry())
    async with runtime_channel(running.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        op = await start(stub, "ticker", {"steps": 1, "step_seconds": 30})
        seen: list[op_pb.Event] = []
        got_chunk = asyncio.Event()

        async def follow() -> None:
            async for event in watch(stub, op.id):
                seen.append(event)
                if event.WhichOneof("kind") == "output_chunk":
                    got_chunk.set()

        watcher = asyncio.create_task(follow())
        await asyncio.wait_for(got_chunk.wait(), 10)
        # A 30 s grace is not waited out: open watches end at once.
        await asyncio.wait_for(running.stop(grace=30), timeout=10)
        with pytest.raises(aio.AioRpcError) as err:
            await watcher
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"after_seq={seen[-1].seq}" in (err.value.details() or "")
