"""Stops sent straight to the replica that runs the operation (issue 17).

On PostgreSQL any replica can record a stop; the runner that runs the operation hears of it by
the stop's notification (notifications.py), which costs a trip through the database server and
its listener connection. So the replica that records a stop for an operation another runner runs
also sends it there directly (DeliverStop), in parallel with the notification: whichever arrives
first cuts the step, the other finds the run already stopping. Nothing depends on the direct
path: the stop is stored and notified before it is sent, so a missing or stale address, a dead
or unreachable owner, or a failed call costs nothing but its own attempt (the caller's answer
never waits for it), and a dead owner's operation is still halted by the takeover.

Where a runner is reached comes from the database's runner directory (storage/runners.py): each
replica registers its advertised address (`--advertise-address`) at start, re-registers every
minute and unregisters on shutdown. Runner ids are unique per process, so a known address is
never another live runner's; it can only point at nothing (the owner died) or at a process that
answers `running: false`. Addresses are read into memory at start and re-read when a stop names
a runner not known yet (at most once a second).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

from grpc import aio

from runtime_service import convert
from runtime_service.domain import Event
from runtime_service.metrics import RuntimeMetrics
from runtime_service.storage import STORAGE_FAILURES, Storage
from runtime_service.storage.runners import REGISTER_SECONDS
from stopline import tracing
from stopline.transport import ClientTLS, bearer_metadata, open_channel
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc

if TYPE_CHECKING:
    Stub = rt_grpc.RuntimeServiceAsyncStub
else:
    Stub = rt_grpc.RuntimeServiceStub

log = logging.getLogger(__name__)

# A replica answers DeliverStop in milliseconds; the notification covers for one that does not.
CALL_TIMEOUT_SECONDS = 1.0
# A stop for a runner not in memory re-reads the directory at most this often.
LOOKUP_INTERVAL_SECONDS = 1.0
# Channels kept open to other replicas (least recently used closed first).
MAX_CHANNELS = 64
# gRPC reconnects quickly to a peer that restarted; a dead one is not retried in a tight loop.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class DirectStops:
    def __init__(
        self,
        storage: Storage,
        runner_id: str,
        meters: RuntimeMetrics,
        token: str | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self._storage = storage
        self._runner_id = runner_id
        self._counts = meters.stop_forward
        self._metadata = bearer_metadata(token) if token else None
        self._tls = tls
        self._addresses: dict[str, str] = {}
        self._looked_up_at = float("-inf")
        self._lookup: asyncio.Task[None] | None = None
        self._channels: OrderedDict[str, tuple[aio.Channel, Stub]] = OrderedDict()
        self._sends: set[asyncio.Task[None]] = set()
        self._registration: asyncio.Task[None] | None = None
        self.address: str | None = None

    def start(self, address: str) -> None:
        """Register this runner at `address` (again every minute) and learn the others'."""
        self.address = address
        self._registration = asyncio.create_task(self._register_loop(), name="runner directory")

    def send(self, runner_id: str, stop_requested: Event) -> None:
        """Send a committed stop to the runner that runs its operation, without waiting."""
        task = asyncio.create_task(self._send(runner_id, stop_requested), name="direct stop")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def close(self) -> None:
        for task in [*self._sends, *([self._registration] if self._registration else [])]:
            task.cancel()
        pending = [*self._sends, *([self._registration] if self._registration else [])]
        if pending:
            await asyncio.wait(pending)
        if self.address is not None:
            try:
                await self._storage.unregister_runner(self._runner_id)
            except STORAGE_FAILURES as exc:
                log.debug("could not unregister this runner (%s); its row will expire", exc)
        for channel, _ in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()

    async def _register_loop(self) -> None:
        assert self.address is not None
        while True:
            try:
                await self._storage.register_runner(self._runner_id, self.address)
                self._addresses = await self._storage.runner_addresses()
                self._looked_up_at = time.monotonic()
            except STORAGE_FAILURES as exc:
                log.warning("registering this runner's address failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(REGISTER_SECONDS)

    async def _send(self, runner_id: str, stop_requested: Event) -> None:
        address = await self._address_of(runner_id)
        if address is None:
            self._counts["no_route"].inc()
            return
        request = rt_pb.DeliverStopRequest(
            runner_id=runner_id, stop_requested=convert.event_to_pb(stop_requested)
        )
        try:
            reply = await self._stub(address).DeliverStop(
                request,
                timeout=CALL_TIMEOUT_SECONDS,
                metadata=cast(Any, tracing.outgoing_metadata(self._metadata)),
            )
        except aio.AioRpcError as exc:
            self._counts["unreachable"].inc()
            log.info(
                "stop of %s not sent straight to %s at %s (%s: %s); the notification carries it",
                stop_requested.operation_id,
                runner_id,
                address,
                exc.code().name,
                exc.details(),
            )
            return
        self._counts["running" if reply.running else "not_running"].inc()
        if not reply.running:
            log.info(
                "stop of %s sent to %s at %s, which does not run it; the notification carries it",
                stop_requested.operation_id,
                runner_id,
                address,
            )

    async def _address_of(self, runner_id: str) -> str | None:
        address = self._addresses.get(runner_id)
        if address is not None:
            return address
        if self._lookup is None and time.monotonic() - self._looked_up_at >= (
            LOOKUP_INTERVAL_SECONDS
        ):
            self._lookup = asyncio.create_task(self._read_directory())
        if self._lookup is not None:
            await asyncio.shield(self._lookup)
        return self._addresses.get(runner_id)

    async def _read_directory(self) -> None:
        try:
            self._addresses = await self._storage.runner_addresses()
        except STORAGE_FAILURES as exc:
            log.debug("reading the runner directory failed (%s)", exc)
        finally:
            self._looked_up_at = time.monotonic()
            self._lookup = None

    def _stub(self, address: str) -> Stub:
        known = self._channels.get(address)
        if known is not None:
            self._channels.move_to_end(address)
            return known[1]
        channel = open_channel(address, None, self._tls, CHANNEL_OPTIONS)
        self._channels[address] = (channel, rt_grpc.RuntimeServiceStub(channel))
        while len(self._channels) > MAX_CHANNELS:
            _, (old, _) = self._channels.popitem(last=False)
            task = asyncio.create_task(old.close(grace=None))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        return self._channels[address][1]
