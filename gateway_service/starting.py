"""Starting an operation on the runtime, held or not, and letting a held one run.

Either way the start is one `StartAndWatchOperation` call, which creates the operation and
streams its events on the same call: the start's answer and the first step's events come back on
one stream, with no watch call (and no read of storage) between them.

- **Held** (the default): the start carries a hold, so the runtime runs no step until the
  gateway sends `ReleaseOperation` (right after the client has the id) or the hold expires. A
  client that leaves while the start is in flight is stopped before any step ran.
- **Unheld** (`no_hold`): the operation is runnable at once, with no release call before its
  first step. A client that leaves while the start is in flight may see the first step begin,
  and be cut mid-step by its cancel policy.

Either start is retried with the same idempotency key while the runtime is unreachable, so a
start whose answer was lost creates no second operation (`Starter.start` says whose it is then).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay

from gateway_service.config import GatewayConfig
from gateway_service.delivery import StopDeliverer
from gateway_service.runtime_link import RuntimeLink, WatchedStart, backoff, is_retryable
from stopline.grpc_status import UpstreamError
from stopline.v1 import runtime_service_pb2 as rt_pb

log = logging.getLogger(__name__)

# One ReleaseOperation attempt; a release is retried until the hold it ends would expire anyway.
RELEASE_ATTEMPT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Started:
    """The runtime's answer to a start, and whether the operation is this call's to release and
    to stop under its policy: the runtime created it now, or an earlier attempt of this call may
    have created it and its answer was lost (`Starter.start` says how that is told). `watch`:
    the start's stream, its events still to read. `hold`: the start asked for a hold."""

    response: rt_pb.StartOperationResponse
    ours: bool
    watch: WatchedStart
    hold: bool

    @property
    def held(self) -> bool:
        """Whether the operation may be held, so that letting it run takes a release: a held
        start's, or one an unheld start found under its key (an earlier held start's)."""
        return self.hold or not self.response.created


class Starter:
    def __init__(self, config: GatewayConfig, link: RuntimeLink, deliverer: StopDeliverer) -> None:
        self.config = config
        self.link = link
        self.deliverer = deliverer

    async def start(
        self, request: rt_pb.StartOperationRequest, generated_key: bool, hold: bool = True
    ) -> Started:
        """Start, with its watch on the same stream (held: `request` carries the hold),
        retrying with the same key while the runtime is unreachable.

        A retry answers `created = false` when an earlier attempt committed but its answer was
        lost; the operation is still this call's, to release and to stop under its policy. It is
        taken as ours when the key is one this gateway generated for this call, or when an
        earlier attempt failed in a way that may have followed a commit (UNAVAILABLE, deadline).
        A client's key that answers `created = false` at the first attempt is a repeat of an
        earlier call, whose own client decides; after a lost answer the gateway cannot tell
        such a repeat from its own start, and treats it as its own (README, Held starts)."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.config.start_retry_seconds),
            wait=backoff(1.0),
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )
        maybe_committed = generated_key
        async for attempt in retrying:
            with attempt:
                try:
                    watch = await self.link.start_and_watch(request)
                except UpstreamError as exc:
                    maybe_committed = maybe_committed or is_retryable(exc)
                    raise
                response = watch.response
                return Started(response, response.created or maybe_committed, watch, hold)
        raise AssertionError("unreachable: tenacity reraises")

    async def release_unless_stopping(self, operation_id: str, owner: str, key: str) -> None:
        """Release a start, but first let a stop by its key that reached this gateway while the
        start was in flight land (the operation is then interrupted, and the release changes
        nothing): such a stop wins however its delivery and the start interleave."""
        stopping = self.deliverer.pending_by_key(owner, key)
        if stopping is not None:
            await asyncio.shield(stopping.done)
        await self.release(operation_id)

    async def release(self, operation_id: str) -> None:
        """Let a held operation run. Retried (ReleaseOperation is idempotent) while the hold
        lasts, each attempt cut short so that a runtime that does not answer (frozen, or dying
        with the call in flight) costs one attempt, not the hold; after the hold there is
        nothing left to release."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.config.start_hold_seconds),
            wait=backoff(RELEASE_ATTEMPT_SECONDS / 4),
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # The first to the replica streaming the operation (see replicas.py); a
                    # retry to any, in case that replica is the trouble.
                    routed = attempt.retry_state.attempt_number == 1
                    await self._release_once(operation_id, routed)
        except UpstreamError as exc:
            # The runtime's hold expires by itself; the operation only starts a little later.
            log.warning("could not release %s (%s); its hold will expire", operation_id, exc)

    async def _release_once(self, operation_id: str, routed: bool) -> None:
        try:
            async with asyncio.timeout(RELEASE_ATTEMPT_SECONDS):
                await self.link.release(operation_id, routed)
        except TimeoutError:
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"ReleaseOperation got no answer in {RELEASE_ATTEMPT_SECONDS:g}s",
            ) from None
