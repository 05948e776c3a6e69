"""A held start's release (gateway Starter.release_soon) against a scripted runtime link: its
first attempt's call is begun before the task that awaits it runs, a first attempt that fails
in a way worth retrying goes on to the retries, and a stop by the start's key that is in flight
here still lands before any release is sent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import grpc

from gateway_service.delivery import StopDeliverer
from gateway_service.runtime_link import RuntimeLink
from gateway_service.starting import Starter
from stopline.grpc_status import UpstreamError
from stopline.v1 import runtime_service_pb2 as rt_pb
from tests.test_gateway import gateway_config

OP_ID = "00000000-0000-4000-8000-000000000002"


class ReleaseLink:
    """Each first attempt (release_now) and each retried one (release) does what the next entry
    of its script says: "ok", or a status code to fail with."""

    def __init__(self, *now: str | grpc.StatusCode) -> None:
        self.now_script = list(now)
        self.calls: list[str] = []

    def release_now(
        self, operation_id: str, routed: bool = True
    ) -> asyncio.Future[rt_pb.ReleaseOperationResponse]:
        self.calls.append(f"release_now {operation_id} routed={routed}")
        step = self.now_script.pop(0) if self.now_script else "ok"
        return asyncio.ensure_future(self._answer(step))

    async def release(self, operation_id: str, routed: bool = True) -> None:
        self.calls.append(f"release {operation_id} routed={routed}")

    @staticmethod
    async def _answer(step: str | grpc.StatusCode) -> rt_pb.ReleaseOperationResponse:
        if isinstance(step, grpc.StatusCode):
            raise UpstreamError(step, "scripted")
        return rt_pb.ReleaseOperationResponse()


class Deliverer:
    def __init__(self, pending: asyncio.Future[None] | None = None) -> None:
        self.pending = pending

    def pending_by_key(self, owner: str, key: str) -> Any:
        return None if self.pending is None else SimpleNamespace(done=self.pending)


def starter(link: ReleaseLink, deliverer: Deliverer | None = None) -> Starter:
    return Starter(
        gateway_config("127.0.0.1:1"),
        cast(RuntimeLink, link),
        cast(StopDeliverer, deliverer or Deliverer()),
    )


async def test_the_release_is_begun_before_its_task_runs() -> None:
    link = ReleaseLink()
    release = starter(link).release_soon(OP_ID, "", "key")
    assert link.calls == [f"release_now {OP_ID} routed=True"]  # before any await
    await release
    assert link.calls == [f"release_now {OP_ID} routed=True"]  # answered: nothing more


async def test_a_first_attempt_that_fails_worth_retrying_goes_on_to_the_retries() -> None:
    link = ReleaseLink(grpc.StatusCode.UNAVAILABLE)
    await starter(link).release_soon(OP_ID, "", "key")
    assert link.calls == [f"release_now {OP_ID} routed=True", f"release {OP_ID} routed=True"]


async def test_a_first_attempt_refused_for_good_is_not_retried() -> None:
    link = ReleaseLink(grpc.StatusCode.NOT_FOUND)
    await starter(link).release_soon(OP_ID, "", "key")
    assert link.calls == [f"release_now {OP_ID} routed=True"]


async def test_a_stop_by_the_key_in_flight_lands_before_the_release_is_sent() -> None:
    stop_landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    link = ReleaseLink()
    release = asyncio.ensure_future(
        starter(link, Deliverer(stop_landed)).release_soon(OP_ID, "", "key")
    )
    for _ in range(5):
        await asyncio.sleep(0)  # the release's task runs as far as it can
    assert link.calls == []
    stop_landed.set_result(None)
    await release
    assert link.calls == [f"release {OP_ID} routed=True"]
