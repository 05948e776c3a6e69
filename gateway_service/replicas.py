"""Calls straight to the runtime replica that runs an operation.

Through the load-balanced channel a release or a stop lands on any replica. One that lands on a
replica other than the one running the operation still works (the database is the truth: the
release is claimed by whichever runner has room, the stop reaches the runner by PostgreSQL's
notification), but it costs a hop between replicas, and a held start released elsewhere runs
on a replica other than the one streaming its events, so every event takes that hop too.

A replica started with `--advertise-address` names itself in the initial metadata of the streams
of the operations it runs (`stopline.transport.REPLICA_METADATA`). The gateway remembers the name
per operation (bounded, least recently used first out) and sends the operation's release and the
first call of each of its stops there, over a channel of its own to that replica. Hedges and
retries still go through the load-balanced channel, and a replica's channel is used only while
it is connected, so a replica that is gone, or named by an address this gateway cannot reach,
costs nothing but the routing. Replicas come and go (a rolling restart names new addresses), so
once MAX_REPLICAS channels are open, those of replicas no remembered operation runs on are closed
to make room: the bound holds the replicas in use, not the first ones ever named.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from stopline import logs
from stopline.transport import REPLICA_METADATA
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc

log = logging.getLogger(__name__)

# More replicas in use at once than this is not a deployment but a runtime naming garbage: the
# rest are not called directly.
MAX_REPLICAS = 64
# The longest host:port taken from a runtime (a DNS name is at most 253 characters).
MAX_ADDRESS_CHARS = 261


def named_replica(metadata: Any) -> str | None:
    """The replica a stream's initial metadata names, if any (None for metadata not yet
    received, or a runtime that names nobody)."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == REPLICA_METADATA and isinstance(value, str):
            return value if 0 < len(value) <= MAX_ADDRESS_CHARS else None
    return None


class Replicas:
    """Which replica runs which operation, and a channel to each replica named."""

    def __init__(self, open_channel: Callable[[str], aio.Channel], capacity: int) -> None:
        self._open = open_channel
        self._capacity = capacity
        self._routes: OrderedDict[str, str] = OrderedDict()
        # How many remembered operations each replica runs: a replica at 0 may give up its
        # channel (see _make_room).
        self._uses: Counter[str] = Counter()
        self._channels: dict[str, tuple[aio.Channel, rt_grpc.RuntimeServiceAsyncStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def learn(self, operation_id: str, metadata: Any) -> None:
        """Remember the replica a stream of the operation named (nothing if it named none)."""
        replica = named_replica(metadata)
        if replica is None or not operation_id:
            return
        if replica not in self._channels:
            if len(self._channels) >= MAX_REPLICAS and not self._make_room():
                return
            channel = self._open(replica)
            # Connect now, so that the operation's release, a few hundred microseconds from
            # now, finds it ready.
            channel.get_state(try_to_connect=True)
            self._channels[replica] = (channel, rt_grpc.RuntimeServiceStub(channel))
            log.info("runtime replica named", extra=logs.fields(replica=replica))
        before = self._routes.get(operation_id)
        if before != replica:
            if before is not None:
                self._uses[before] -= 1
            self._uses[replica] += 1
        self._routes[operation_id] = replica
        self._routes.move_to_end(operation_id)
        while len(self._routes) > self._capacity:
            _, evicted = self._routes.popitem(last=False)
            self._uses[evicted] -= 1

    def _make_room(self) -> bool:
        """Close the channels of replicas no remembered operation runs on; False: none is."""
        unused = [replica for replica in self._channels if self._uses[replica] <= 0]
        for replica in unused:
            channel, _ = self._channels.pop(replica)
            del self._uses[replica]
            closing = asyncio.ensure_future(channel.close(grace=None))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            log.info("runtime replica forgotten", extra=logs.fields(replica=replica))
        return bool(unused)

    def replica(self, operation_id: str) -> str | None:
        return self._routes.get(operation_id)

    def stub(self, operation_id: str) -> rt_grpc.RuntimeServiceAsyncStub | None:
        """The stub of the replica running the operation, while its channel is connected; None
        sends the call through the load-balanced channel."""
        replica = self._routes.get(operation_id)
        if replica is None:
            return None
        channel, stub = self._channels[replica]
        # try_to_connect: a channel that went idle reconnects for the next call.
        if channel.get_state(try_to_connect=True) is not grpc.ChannelConnectivity.READY:
            return None
        return stub

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
