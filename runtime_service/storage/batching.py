"""Group commit's queue: writes that arrive while a batch is being written wait, and go together
in the next one. Shared by SQLite's group commit (sqlite.GroupCommit, batches on the database
thread) and PostgreSQL's batcher (pg_batch.PostgresBatcher, batches on the event loop); each
says how a batch is written.

Each caller gets its own outcome, and only once its batch has committed. A caller that goes away
(cancelled) does not take its write back: the write stands, unreported.

SQLite's stop writes (recording a stop, and the halt it causes) are urgent: they skip the queue
and go in the next batch, alone, so a stop waits only for the batch in flight. Queued behind
everything else, with 3,000 operations stepping in one process, a stop's write waited for 50 ms
on average and a tenth of stops were acknowledged after 65 ms or more (bench.stop_under_load).
What an urgent write overtakes belongs to other operations or comes second anyway: a step's own
writes have all landed before its halt is written (StepEvents.close), and a stop that overtakes a
write of its operation is one the write then sees, as if the stop had come a moment earlier.
PostgreSQL's batcher keeps one queue: its batch costs one round trip whatever it holds, and
stops first (alone, or leading the next batch) made the 200-operation concurrency scenario
8-13 % slower, with no stop acknowledged sooner.

The queue settles each caller's future itself, with the error already as storage reports it
(`translate`) and the write's time told to the metrics (`on_write`): a second future per write,
copied over by a done-callback, cost the runner's every write a future and a turn of the loop,
and a stop's write on PostgreSQL a hop before its answer could leave.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

# One write's outcome: (True, its result) or (False, the exception to raise to its caller).
Outcome = tuple[bool, Any]


class Queued(Protocol):
    @property
    def future(self) -> asyncio.Future[Any]: ...

    @property
    def began(self) -> float:
        """time.monotonic() when the write was queued."""
        ...


Q = TypeVar("Q", bound=Queued)


class WriteQueue(Generic[Q]):
    def __init__(
        self,
        name: str,
        max_batch: int,
        observe: Callable[[int, float], None] | None = None,
        translate: Callable[[BaseException], BaseException] | None = None,
        on_write: Callable[[float], None] | None = None,
    ) -> None:
        self._name = name
        self._max_batch = max_batch
        # Told each batch's size and seconds (the metrics).
        self._observe = observe
        # What a failed write's error reaches its caller as (storage's own errors).
        self._translate = translate or _unchanged
        # Told each write's seconds from queued to committed or failed.
        self._on_write = on_write
        self._queue: deque[Q] = deque()
        self._urgent: deque[Q] = deque()
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        """A batch is being written (or about to be)."""
        return self._draining

    def _enqueue(self, queued: Q, urgent: bool = False) -> asyncio.Future[Any]:
        """Queue `queued` now (it goes in a batch whether or not its future is awaited) and
        return its future. `urgent`: in the next batch, with only other urgent writes."""
        (self._urgent if urgent else self._queue).append(queued)
        if not self._draining:
            self._draining = True
            self._drainer = asyncio.create_task(self._drain(), name=self._name)
        return queued.future

    def _take(self, queue: deque[Q]) -> list[Q]:
        return [queue.popleft() for _ in range(min(len(queue), self._max_batch))]

    async def _write_batch(self, batch: list[Q], urgent: bool) -> list[Outcome]:
        """Write `batch`; one outcome per write, in order. `urgent`: it holds urgent writes."""
        raise NotImplementedError

    async def _drain(self) -> None:
        batch: list[Q] = []
        try:
            while self._urgent or self._queue:
                urgent = bool(self._urgent)
                batch = self._take(self._urgent if urgent else self._queue)
                size = len(batch)
                began = time.monotonic()
                outcomes = await self._write_batch(batch, urgent)
                ended = time.monotonic()
                if self._observe is not None:
                    self._observe(size, ended - began)
                for queued, (ok, value) in zip(batch, outcomes, strict=True):
                    if self._on_write is not None:
                        self._on_write(ended - queued.began)
                    if queued.future.done():
                        continue  # its caller went away; the write itself stands
                    if ok:
                        queued.future.set_result(value)
                    else:
                        queued.future.set_exception(self._translate(value))
        except BaseException as exc:  # the loop is going away: fail whatever is left
            # The batch in flight too (its outcome will never be read). A cancelled drainer
            # (shutdown) cancels them, as a cancelled caller's await would: one exception
            # object set on thousands of futures grew a frame per re-raise and was logged,
            # unretrieved, once per future, for seconds, at the end of a busy runtime.
            cancelled = isinstance(exc, asyncio.CancelledError)
            for queued in (*batch, *self._urgent, *self._queue):
                if queued.future.done():
                    continue
                if cancelled:
                    queued.future.cancel()
                else:
                    queued.future.set_exception(self._translate(exc))
            self._queue.clear()
            self._urgent.clear()
            raise
        finally:
            self._draining = False


def _unchanged(exc: BaseException) -> BaseException:
    return exc
