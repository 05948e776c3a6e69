"""Following a runtime watch (gateway_service/follow.py) against a scripted runtime link: resumes
from the last forwarded seq, drops repeats, and tells "lost after seq N" by a typed exception."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import cast

import grpc
import pytest

from gateway_service.follow import Follower, LostAfter
from gateway_service.runtime_link import RuntimeLink
from gateway_service.streams import EventItem, StreamRegistry
from stopline.grpc_status import UpstreamError
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb

OP_ID = "0190f5e0-0000-7000-8000-000000000001"
Script = Sequence[op_pb.Event | UpstreamError]


def step(seq: int) -> op_pb.Event:
    return op_pb.Event(operation_id=OP_ID, seq=seq, step_started=op_pb.StepStarted(step=seq))


def completed(seq: int) -> op_pb.Event:
    return op_pb.Event(operation_id=OP_ID, seq=seq, completed=op_pb.OperationCompleted())


def unavailable() -> UpstreamError:
    return UpstreamError(grpc.StatusCode.UNAVAILABLE, "connection reset")


class ScriptedLink:
    """Each watch plays the next script: its events, then its error if it ends with one."""

    def __init__(self, *scripts: Script, operation: op_pb.Operation | None = None) -> None:
        self._scripts: Iterator[Script] = iter(scripts)
        self.watched_from: list[int] = []
        self.operation = operation or op_pb.Operation(id=OP_ID)

    async def watch(self, operation_id: str, after_seq: int) -> AsyncGenerator[op_pb.Event, None]:
        self.watched_from.append(after_seq)
        for item in next(self._scripts):
            if isinstance(item, UpstreamError):
                raise item
            yield item

    async def get(self, operation_id: str) -> rt_pb.GetOperationResponse:
        return rt_pb.GetOperationResponse(operation=self.operation)


def follower(link: ScriptedLink) -> Follower:
    return Follower(cast(RuntimeLink, link), StreamRegistry(), 0, reconnect_deadline_seconds=5)


async def followed(link: ScriptedLink, after_seq: int = 0) -> list[int]:
    items = [item async for item in follower(link).follow(OP_ID, after_seq)]
    assert all(isinstance(item, EventItem) for item in items)
    return [cast(EventItem, item).event.seq for item in items]


async def test_a_broken_watch_resumes_from_the_last_forwarded_seq_without_repeats() -> None:
    link = ScriptedLink(
        [step(1), step(2), unavailable()],
        [step(2), completed(3)],  # the runtime resends seq 2: dropped
    )
    assert await followed(link) == [1, 2, 3]
    assert link.watched_from == [0, 2]


async def test_a_watch_lost_after_progress_says_the_seq_as_an_attribute() -> None:
    link = ScriptedLink([step(1), step(2), step(3), unavailable()])
    forwarded: list[object] = []
    with pytest.raises(LostAfter) as lost:
        await follower(link)._forward(OP_ID, 1, forwarded.append)
    assert lost.value.seq == 3
    assert [cast(EventItem, item).event.seq for item in forwarded] == [2, 3]


async def test_a_reconnect_from_the_terminal_seq_ends_cleanly() -> None:
    finished = op_pb.Operation(id=OP_ID, status=op_pb.OPERATION_STATUS_COMPLETED, last_seq=3)
    link = ScriptedLink([], operation=finished)
    assert await followed(link, after_seq=3) == []
    assert link.watched_from == [3]


async def test_a_refusal_without_progress_is_passed_on_as_is() -> None:
    refused = UpstreamError(grpc.StatusCode.NOT_FOUND, "operation not found")
    link = ScriptedLink([refused])
    with pytest.raises(UpstreamError) as caught:
        await followed(link)
    assert caught.value is refused
    assert link.watched_from == [0]
