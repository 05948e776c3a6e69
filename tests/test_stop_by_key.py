"""Stops of issue 14. By idempotency key: a stop may come before the operation's id exists, even
before the start is sent, and wins with no timing window; the gateway releases a held start as
soon as the client has the id, with no fixed wait. Causes: every stop carries one from a closed
set, on the stop_requested event, the interrupted event, the operation's StopRequest, and in
`stopline show` / `ls`; one test per cause the system sets.

Through the gateway on both backends. The agent is GatedAgent: its step never ends unless the
test opens its gate (never here), and it records every step that began, so any step that ran is
visible."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from gateway_service import core
from gateway_service.server import RunningGateway, start_gateway
from runtime_service.app import RuntimeApp
from runtime_service.convert import event_to_pb, operation_to_pb
from runtime_service.domain import EventKind, InterruptOutcome, OperationStatus, StopCause
from runtime_service.server import RunningRuntime, start_runtime
from runtime_service.storage import Created, Storage, utcnow
from runtime_service.storage.errors import StorageError
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import EXIT_INTERRUPTED, describe_event, describe_operation
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from stopline_cli.client import Follower
from tests.agents import GatedAgent, registry
from tests.conftest import eventually, runtime_config
from tests.credentials import OTHER_TOKEN, gateway_channel, runtime_channel
from tests.test_gateway import gateway_config, is_terminal, kind, read_until, start_request
from tests.test_leases import wait_until_lease_lapses

if TYPE_CHECKING:
    Stub = pb_grpc.GatewayServiceAsyncStub

TRIALS = 200
ABORTED_AT_CREATE = ["event:created", "event:stop_requested", "event:interrupted"]


@pytest.fixture
async def runtime(db_url: str, gated: GatedAgent) -> AsyncIterator[RunningRuntime]:
    running = await start_runtime(runtime_config(db_url), registry(gated))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def gateway(runtime: RunningRuntime) -> AsyncIterator[RunningGateway]:
    # These tests read the delivery's outcome: a wide acknowledgment window, so that a loaded
    # machine answers DELIVERED with the outcome rather than PENDING (its timing is benchmarked).
    running = await start_gateway(gateway_config(runtime.address, stop_ack_seconds=10))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def mine(gateway: RunningGateway) -> AsyncIterator[Stub]:
    async with gateway_channel(gateway.address) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


@pytest.fixture
async def theirs(gateway: RunningGateway) -> AsyncIterator[Stub]:
    async with gateway_channel(gateway.address, OTHER_TOKEN) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


def start(key: str) -> pb.StartAndStreamRequest:
    return pb.StartAndStreamRequest(
        agent="gated", idempotency_key=key, cancel_policy=pb.CANCEL_POLICY_KEEP_RUNNING
    )


def stop(key: str) -> pb.StopOperationRequest:
    return pb.StopOperationRequest(idempotency_key=key, reason="stopped by key")


async def assert_aborted_at_create(runtime: RunningRuntime, op_id: str, events: list[Any]) -> None:
    """INTERRUPTED with no step: created, stop_requested, interrupted (step 0, not mid-step)."""
    assert [kind(u) for u in events] == ABORTED_AT_CREATE
    halted = events[-1].event.interrupted
    assert (halted.mid_step, halted.step) == (False, 0)
    operation = await runtime.app.operations.get(op_id)
    assert operation.status is OperationStatus.INTERRUPTED and operation.steps_completed == 0
    assert await runtime.app.storage.step_records(op_id) == []


async def test_a_stop_by_key_before_the_start_creates_it_interrupted(
    mine: Stub, runtime: RunningRuntime, gated: GatedAgent
) -> None:
    for trial in range(TRIALS):
        key = f"before-{trial}"
        answer = await mine.StopOperation(stop(key))
        assert answer.delivery == pb.STOP_DELIVERY_DELIVERED
        assert answer.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD
        assert not answer.HasField("operation")  # no id exists yet
        updates = await read_until(mine.StartAndStream(start(key)), is_terminal)
        op_id = updates[0].accepted.operation_id
        assert updates[0].accepted.operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
        await assert_aborted_at_create(runtime, op_id, updates[1:])
        # The tombstone was consumed: the same key now names that operation.
        again = await mine.StopOperation(stop(key))
        assert again.outcome == rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED
        assert again.operation.id == op_id
    assert gated.steps_started == []


async def test_a_stop_by_key_during_the_start_runs_no_step(
    mine: Stub, runtime: RunningRuntime, gateway: RunningGateway, gated: GatedAgent
) -> None:
    """Three interleavings, cycled: the stop reaches the runtime before the start does (the
    gateway's start waits for the stop's answer), after the runtime created the operation but
    before the gateway has its answer (held there until the stop is answered), and sent right
    after the start, racing it freely. Every time: the start and the stop agree on the id, and
    no step began."""
    link = gateway.gateway.link
    real_start = link.start_and_watch
    mode = ""
    stopped, created = asyncio.Event(), asyncio.Event()

    async def start_in_flight(request: rt_pb.StartOperationRequest) -> Any:
        if mode == "stop first":
            await stopped.wait()
        response = await real_start(request)
        if mode == "start first":
            created.set()
            await stopped.wait()
        return response

    link.start_and_watch = start_in_flight  # type: ignore[method-assign]
    outcomes: dict[str, set[int]] = {}
    for trial in range(TRIALS):
        mode = ("stop first", "start first", "racing")[trial % 3]
        stopped.clear()
        created.clear()
        key = f"during-{trial}"
        call = mine.StartAndStream(start(key))
        if mode == "start first":
            await asyncio.wait_for(created.wait(), 10)
        answer = await mine.StopOperation(stop(key))
        stopped.set()
        updates = await read_until(call, is_terminal)
        op_id = updates[0].accepted.operation_id
        outcomes.setdefault(mode, set()).add(answer.outcome)
        if answer.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD:
            assert not answer.HasField("operation")
            await assert_aborted_at_create(runtime, op_id, updates[1:])
        else:
            assert answer.outcome in (
                rt_pb.INTERRUPT_OUTCOME_ACCEPTED,
                rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED,
            )
            assert answer.operation.id == op_id
            events = [u for u in updates[1:] if u.WhichOneof("update") == "event"]
            await assert_aborted_at_create(runtime, op_id, events)
    assert gated.steps_started == []
    assert outcomes["stop first"] == {rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD}
    assert outcomes["start first"] == {rt_pb.INTERRUPT_OUTCOME_ACCEPTED}


async def test_a_stop_by_key_right_after_the_id_arrives_ends_it_before_any_step_completes(
    mine: Stub, runtime: RunningRuntime, gated: GatedAgent
) -> None:
    """The start is released as soon as the client has the id (no window), so a stop sent
    after the id arrived may find the first step begun: it is then cut mid-step. Either way
    the operation ends INTERRUPTED having completed no step, and the ids agree."""
    for trial in range(TRIALS):
        key = f"after-{trial}"
        call = mine.StartAndStream(start(key))
        first = await read_until(call, lambda u: kind(u) == "accepted")
        op_id = first[0].accepted.operation_id
        answer = await mine.StopOperation(stop(key))
        assert answer.outcome == rt_pb.INTERRUPT_OUTCOME_ACCEPTED
        assert answer.operation.id == op_id
        await read_until(call, is_terminal)
        operation = await runtime.app.operations.get(op_id)
        assert operation.status is OperationStatus.INTERRUPTED and operation.steps_completed == 0
        records = await runtime.app.storage.step_records(op_id)
        assert all(r.outcome == "interrupted" for r in records)
    assert all(step == 0 for _, step in gated.steps_started)


# ------------------------------------------------------------------------ keys and principals


async def test_another_principals_key_is_never_affected(
    mine: Stub, theirs: Stub, runtime: RunningRuntime, gated: GatedAgent
) -> None:
    # Their stop with my key, before my start: their own tombstone; my start runs.
    answer = await theirs.StopOperation(stop("shared-key"))
    assert answer.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD
    call = mine.StartAndStream(start("shared-key"))
    updates = await read_until(call, lambda u: kind(u) == "event:step_started")
    op_id = updates[0].accepted.operation_id
    # Their stop with my key after my start: still only their tombstone.
    again = await theirs.StopOperation(stop("shared-key"))
    assert again.outcome == rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED
    assert not again.HasField("operation")
    answer = await theirs.StopOperation(stop("another-key"))
    assert answer.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD
    mine_too = mine.StartAndStream(start("another-key"))
    other = (await read_until(mine_too, lambda u: kind(u) == "event:step_started"))[0]
    operation = await runtime.app.operations.get(op_id)
    assert operation.status is OperationStatus.RUNNING and operation.stop is None
    assert {op for op, _ in gated.steps_started} == {op_id, other.accepted.operation_id}
    # Their start with the key consumes their tombstone, not mine.
    theirs_call = theirs.StartAndStream(start("shared-key"))
    theirs_updates = await read_until(theirs_call, is_terminal)
    assert theirs_updates[0].accepted.operation_id != op_id
    assert [kind(u) for u in theirs_updates[1:]] == ABORTED_AT_CREATE
    call.cancel()
    mine_too.cancel()


async def test_a_second_stop_by_the_same_key_before_the_start_is_already_requested(
    mine: Stub,
) -> None:
    first = await mine.StopOperation(stop("twice"))
    second = await mine.StopOperation(stop("twice"))
    assert first.outcome == rt_pb.INTERRUPT_OUTCOME_RECORDED_AHEAD
    assert second.outcome == rt_pb.INTERRUPT_OUTCOME_ALREADY_REQUESTED


async def test_a_stop_names_an_id_or_a_key_not_both(mine: Stub, runtime: RunningRuntime) -> None:
    both = pb.StopOperationRequest(
        operation_id="00000000-0000-4000-8000-000000000000", idempotency_key="k"
    )
    with pytest.raises(aio.AioRpcError) as err:
        await mine.StopOperation(both)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with runtime_channel(runtime.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        for request in (
            rt_pb.InterruptOperationRequest(
                operation_id="00000000-0000-4000-8000-000000000000", idempotency_key="k"
            ),
            rt_pb.InterruptOperationRequest(idempotency_key="k", only_if_unwatched=True),
            rt_pb.InterruptOperationRequest(idempotency_key="k" * 201),
        ):
            with pytest.raises(aio.AioRpcError) as err:
                await stub.InterruptOperation(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------ the runtime alone


@pytest.fixture
async def quick_expiry(db_url: str, gated: GatedAgent) -> AsyncIterator[RuntimeApp]:
    app = await RuntimeApp.open(
        runtime_config(db_url, stop_tombstone_seconds=0.05), registry(gated)
    )
    try:
        yield app
    finally:
        await app.close()


async def test_a_tombstone_past_its_expiry_does_not_affect_a_later_start(
    quick_expiry: RuntimeApp, gated: GatedAgent, db_url: str
) -> None:
    ops = quick_expiry.operations
    ahead = await ops.interrupt_by_key("late", "tester", "tester", "too early")
    assert ahead.outcome is InterruptOutcome.RECORDED_AHEAD
    recorded = utcnow()  # after the tombstone's write, whose expiry counts from its own time

    async def expired() -> bool:
        return (utcnow() - recorded).total_seconds() > 0.1

    await eventually(expired)
    created = await ops.start("gated", {}, "late", owner="tester")
    assert created.created and created.operation.status is OperationStatus.PENDING
    await eventually(lambda: _began(gated, created.operation.id))
    # The expired tombstone is gone once another stop by key is written (the cleanup).
    again = await ops.interrupt_by_key("other", "tester", "tester", "")
    assert again.outcome is InterruptOutcome.RECORDED_AHEAD
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            left = conn.execute(text("SELECT idempotency_key FROM stop_tombstones")).scalars()
            assert list(left) == ["other"]
    finally:
        engine.dispose()


async def _began(gated: GatedAgent, op_id: str) -> bool:
    return any(op == op_id for op, _ in gated.steps_started)


# A fault in the database itself, for either dialect: the write of a `stop_requested` event fails.
_FAILING_STOP = {
    "sqlite": [
        "CREATE TRIGGER fail_stop BEFORE INSERT ON events WHEN NEW.kind = 'stop_requested' "
        "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION fail_stop() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'injected fault'; END $$",
        "CREATE TRIGGER fail_stop BEFORE INSERT ON events FOR EACH ROW "
        "WHEN (NEW.kind = 'stop_requested') EXECUTE FUNCTION fail_stop()",
    ],
}
_REPAIRED = {
    "sqlite": ["DROP TRIGGER fail_stop"],
    "postgresql": ["DROP TRIGGER fail_stop ON events", "DROP FUNCTION fail_stop()"],
}


def _execute(db_url: str, statements: list[str]) -> None:
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


async def test_a_start_whose_stop_ahead_fails_to_commit_applies_it_when_retried(
    db_url: str, storage: Storage
) -> None:
    """A stop by key stored before its start (a tombstone), and the start's write of that stop
    failing (the database refuses it): the tombstone must survive the failure, so that the
    start's retry stops the operation before any step. Meanwhile no runner may claim what the
    failed start left behind (PostgreSQL commits the create before the stop: the operation is
    held). Before, the tombstone was taken in a write of its own, and the retry found a PENDING
    operation that ran once its hold ended."""
    ahead = await storage.record_stop_by_key("me", "early", "me", "too early", StopCause.USER, 600)
    assert ahead.outcome is InterruptOutcome.RECORDED_AHEAD
    dialect = make_url(db_url).get_backend_name()
    _execute(db_url, _FAILING_STOP[dialect])
    with pytest.raises(StorageError, match="injected fault"):
        await storage.create("gated", {}, "early", owner="me")
    assert (await storage.claim_next("runner", 10, 30)).claimed == []
    _execute(db_url, _REPAIRED[dialect])

    retried = await storage.create("gated", {}, "early", owner="me")
    op_id = retried.operation.id
    assert retried.operation.status is OperationStatus.INTERRUPTED
    assert retried.operation.stop is not None and retried.operation.stop.cause is StopCause.USER
    assert [e.kind for e in await storage.events_after(op_id, 0)] == [
        EventKind.CREATED,
        EventKind.STOP_REQUESTED,
        EventKind.INTERRUPTED,
    ]
    assert [e.kind for e in retried.events][-2:] == [
        EventKind.STOP_REQUESTED,
        EventKind.INTERRUPTED,
    ]
    assert await storage.step_records(op_id) == []
    assert await storage.claim_and_start(op_id, "runner", 30) is None
    # Starts no tombstone names (another owner's key, a key never stopped) are claimable at once.
    theirs = (await storage.create("gated", {}, "early", owner="them")).operation.id
    fresh = (await storage.create("gated", {}, "fresh", owner="me")).operation.id
    claimed = (await storage.claim_next("runner", 10, 30)).claimed
    assert sorted(c.operation.id for c in claimed) == sorted([theirs, fresh])


async def test_a_start_with_a_private_key_looks_for_no_stop_ahead(storage: Storage) -> None:
    """`key_private`: the caller alone knows the key (a gateway's retry key), so the start skips
    the look for a stop stored ahead by it. Shown with a tombstone a caller should never have
    been able to store: the private start neither applies it nor holds the operation for it,
    and a start by the same key that is not private still does both."""
    await storage.record_stop_by_key("me", "shared", "me", "too early", StopCause.USER, 600)
    private = await storage.create("gated", {}, "shared", owner="me", key_private=True)
    assert private.operation.status is OperationStatus.PENDING
    assert private.operation.stop is None
    assert [e.kind for e in private.events] == [EventKind.CREATED]
    claimed = (await storage.claim_next("runner", 10, 30)).claimed
    assert [c.operation.id for c in claimed] == [private.operation.id]

    await storage.record_stop_by_key("me", "ahead", "me", "too early", StopCause.USER, 600)
    public = await storage.create("gated", {}, "ahead", owner="me")
    assert public.operation.status is OperationStatus.INTERRUPTED


async def test_the_runtime_takes_key_private_from_the_start_request(
    runtime: RunningRuntime,
) -> None:
    async with runtime_channel(runtime.address) as channel:
        stub = rt_grpc.RuntimeServiceStub(channel)
        for key in ("private", "public"):
            await stub.InterruptOperation(
                rt_pb.InterruptOperationRequest(idempotency_key=key, owner="", reason="ahead")
            )
        starts = {
            key: await stub.StartOperation(
                rt_pb.StartOperationRequest(
                    agent="gated", idempotency_key=key, key_private=key == "private"
                )
            )
            for key in ("private", "public")
        }
    assert starts["private"].operation.status != op_pb.OPERATION_STATUS_INTERRUPTED
    assert starts["public"].operation.status == op_pb.OPERATION_STATUS_INTERRUPTED


async def test_stops_by_key_racing_held_starts_always_win(
    app: RuntimeApp, gated: GatedAgent
) -> None:
    """The storage race without the gateway: a held start and a stop by its key sent together,
    in both orders, on the runtime's own threads and connections; then the start is released
    (as the gateway does once the client has the id). No step ever begins."""
    ops = app.operations

    async def pair(n: int) -> None:
        key = f"race-{n}"
        starting: Awaitable[Any] = ops.start("gated", {}, key, hold_seconds=30, owner="o")
        stopping: Awaitable[Any] = ops.interrupt_by_key(key, "o", "o", "race")
        first, second = (starting, stopping) if n % 2 else (stopping, starting)
        results = await asyncio.gather(first, second)
        created = next(r for r in results if isinstance(r, Created))
        await ops.release(created.operation.id)
        operation = await ops.get(created.operation.id)
        assert operation.status is OperationStatus.INTERRUPTED, (n, operation)

    await asyncio.gather(*(pair(n) for n in range(100)))
    assert gated.steps_started == []


# ------------------------------------------------------------------------ no release delay


async def test_the_first_step_starts_with_no_timer_between_the_id_and_the_release(
    mine: Stub, gated: GatedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before issue 14 the gateway slept `release_delay_seconds` after sending the id; now the
    release follows the id at once. Every sleep the gateway's start path takes is recorded (the
    real sleep still runs): none may happen between the id and the first step."""
    real_sleep = asyncio.sleep
    slept: list[float] = []

    async def recording_sleep(delay: float, *args: Any) -> Any:
        caller = inspect.stack()[1].filename
        if Path(caller) == Path(core.__file__):
            slept.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    for trial in range(5):
        call = mine.StartAndStream(start(f"fast-{trial}"))
        updates = await read_until(call, lambda u: kind(u) == "event:step_started", timeout=5)
        assert kind(updates[0]) == "accepted"
        call.cancel()
    assert slept == []
    assert len(gated.steps_started) == 5


# ------------------------------------------------------------------------ stopline run


async def test_ctrl_c_of_stopline_run_during_the_start_stops_by_key_and_runs_no_step(
    mine: Stub, runtime: RunningRuntime, gateway: RunningGateway, gated: GatedAgent
) -> None:
    """`stopline run` sends a key; a Ctrl-C while the start is in flight (here: held at the
    gateway until the stop has reached the runtime) stops by that key at once, without waiting
    for the id, and the operation ends with no step."""
    link = gateway.gateway.link
    real_start, real_interrupt = link.start_and_watch, link.interrupt_now
    in_flight, stopped = asyncio.Event(), asyncio.Event()

    async def held_start(request: rt_pb.StartOperationRequest) -> Any:
        in_flight.set()
        await stopped.wait()
        return await real_start(request)

    def interrupt_now(
        request: rt_pb.InterruptOperationRequest,
        deadline_seconds: float,
        routed: bool = False,
        on_answer: Any = None,
    ) -> Any:
        answer = real_interrupt(request, deadline_seconds, routed, on_answer)
        answer.add_done_callback(lambda _: stopped.set())
        return answer

    link.start_and_watch = held_start  # type: ignore[method-assign]
    link.interrupt_now = interrupt_now  # type: ignore[method-assign]
    follower = Follower(mine, as_json=False, idempotency_key="cli-key")
    request = pb.StartAndStreamRequest(agent="gated", idempotency_key="cli-key")
    following = asyncio.ensure_future(follower.follow(lambda: mine.StartAndStream(request)))
    await asyncio.wait_for(in_flight.wait(), 10)
    follower.on_ctrl_c()
    assert await asyncio.wait_for(following, 10) == EXIT_INTERRUPTED
    listed = await mine.ListOperations(pb.ListOperationsRequest())
    (operation,) = listed.operations
    assert operation.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert await runtime.app.storage.step_records(operation.id) == []
    assert gated.steps_started == []


# ------------------------------------------------------------------------ causes


async def stopped_with(runtime: RunningRuntime, op_id: str, cause: int) -> None:
    """The cause is on the stop_requested and interrupted events, the operation, and its line
    in `stopline show` / `ls`."""

    async def ended() -> Any:
        operation = await runtime.app.operations.get(op_id)
        return operation if operation.status is OperationStatus.INTERRUPTED else None

    await eventually(ended)
    events = [event_to_pb(e) for e in await runtime.app.storage.events_after(op_id, 0)]
    by_kind = {e.WhichOneof("kind"): e for e in events}
    assert by_kind["stop_requested"].stop_requested.cause == cause
    assert by_kind["interrupted"].interrupted.cause == cause
    got = await runtime.app.operations.get(op_id)
    assert got.stop is not None
    operation = operation_to_pb(got)
    assert operation.stop_request.cause == cause
    name = op_pb.StopCause.Name(cause).removeprefix("STOP_CAUSE_").lower()  # type: ignore[arg-type]
    assert describe_operation(operation).endswith(f"stop={name}")
    assert describe_event(by_kind["interrupted"]).endswith(f"cause {name}")
    assert describe_event(by_kind["stop_requested"]).endswith(f"cause {name}")


async def test_a_users_stop_by_id_is_user(mine: Stub, runtime: RunningRuntime) -> None:
    call = mine.StartAndStream(start("user-by-id"))
    op_id = (await read_until(call, lambda u: kind(u) == "event:step_started"))[0].accepted
    await mine.StopOperation(pb.StopOperationRequest(operation_id=op_id.operation_id))
    await read_until(call, is_terminal)
    await stopped_with(runtime, op_id.operation_id, op_pb.STOP_CAUSE_USER)


async def test_a_users_stop_by_key_ahead_of_the_start_is_user(
    mine: Stub, runtime: RunningRuntime
) -> None:
    await mine.StopOperation(stop("user-by-key"))
    updates = await read_until(mine.StartAndStream(start("user-by-key")), is_terminal)
    await stopped_with(runtime, updates[0].accepted.operation_id, op_pb.STOP_CAUSE_USER)


async def test_a_client_gone_under_the_stop_policy_is_client_gone(
    mine: Stub, runtime: RunningRuntime, gateway: RunningGateway
) -> None:
    call = mine.StartAndStream(start_request("gated", {}, pb.CANCEL_POLICY_STOP))
    op_id = (await read_until(call, lambda u: kind(u) == "event:step_started"))[0]
    call.cancel()
    await stopped_with(runtime, op_id.accepted.operation_id, op_pb.STOP_CAUSE_CLIENT_GONE)


async def test_an_expired_grace_is_grace_expired(
    mine: Stub, runtime: RunningRuntime, gateway: RunningGateway
) -> None:
    call = mine.StartAndStream(
        start_request("gated", {}, pb.CANCEL_POLICY_STOP_AFTER_GRACE, grace=0.05)
    )
    op_id = (await read_until(call, lambda u: kind(u) == "event:step_started"))[0]
    call.cancel()
    await stopped_with(runtime, op_id.accepted.operation_id, op_pb.STOP_CAUSE_GRACE_EXPIRED)


@pytest.fixture
async def runtime_stub(runtime: RunningRuntime) -> AsyncIterator[Any]:
    async with runtime_channel(runtime.address) as channel:
        yield rt_grpc.RuntimeServiceStub(channel)


async def test_a_direct_interrupt_without_a_cause_is_operator(
    runtime_stub: Any, runtime: RunningRuntime
) -> None:
    started = await runtime_stub.StartOperation(rt_pb.StartOperationRequest(agent="gated"))
    op_id = started.operation.id
    await eventually(lambda: _step_began(runtime, op_id))
    await runtime_stub.InterruptOperation(rt_pb.InterruptOperationRequest(operation_id=op_id))
    await stopped_with(runtime, op_id, op_pb.STOP_CAUSE_OPERATOR)


@pytest.mark.parametrize(
    "cause",
    [
        op_pb.STOP_CAUSE_DEADLINE_EXCEEDED,
        op_pb.STOP_CAUSE_STEP_BUDGET,
        op_pb.STOP_CAUSE_BULK,
        op_pb.STOP_CAUSE_USER,
    ],
)
async def test_a_direct_interrupt_records_the_cause_it_names(
    runtime_stub: Any, runtime: RunningRuntime, cause: int
) -> None:
    """Deadlines, step budgets and bulk stops (issue 14 items 4-5) will name their causes this
    way; until they exist, a caller can."""
    started = await runtime_stub.StartOperation(rt_pb.StartOperationRequest(agent="gated"))
    op_id = started.operation.id
    await eventually(lambda: _step_began(runtime, op_id))
    request = rt_pb.InterruptOperationRequest(operation_id=op_id, cause=cause)  # type: ignore[arg-type]
    await runtime_stub.InterruptOperation(request)
    await stopped_with(runtime, op_id, cause)


async def _step_began(runtime: RunningRuntime, op_id: str) -> bool:
    return any(
        e.kind is EventKind.STEP_STARTED for e in await runtime.app.storage.events_after(op_id, 0)
    )


async def test_a_stopped_orphans_halt_keeps_its_cause(storage: Storage) -> None:
    """The halt of an operation stopped while its owner was dead (claim_next) carries the cause."""
    op_id = (await storage.create("ticker", {}, None)).operation.id
    await storage.claim_and_start(op_id, "A", 0.2)
    await storage.record_stop(op_id, "u", "while A was dead", StopCause.BULK)
    await wait_until_lease_lapses(storage, op_id)
    [halted] = (await storage.claim_next("B", 10, 30)).finished
    assert halted.kind is EventKind.INTERRUPTED and halted.data["cause"] == "BULK"
