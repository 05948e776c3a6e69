"""The runtime's Prometheus metrics, each defined once here (name, help, labels).

Label values come from closed sets: agent names (those registered with this runtime), event kinds,
statuses, storage call names and the stop causes below; never an operation id or a principal.
Hot paths update children bound once (per event kind, per run's agent), not `.labels(...)` per
update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime_service import stop_causes
from runtime_service.domain import OperationStatus, StopCause
from stopline.events import EventKind
from stopline.metrics import LATENCY_BUCKETS, GrpcMetrics, method_names
from stopline.v1 import runtime_service_pb2

CAUSE_UNKNOWN = stop_causes.CAUSE_UNKNOWN
"""A stop whose cause is not known (recorded before stops carried one)."""
CAUSE_NONE = "none"
"""The cause label of an operation that completed or failed."""
AGENT_UNKNOWN = "unregistered"
"""The agent label of an operation whose agent this runtime does not have."""
TOOL_OUTCOMES = {
    EventKind.TOOL_CALL_FINISHED: "finished",
    EventKind.TOOL_CALL_FAILED: "failed",
    EventKind.TOOL_CALL_CANCELLED: "cancelled",
    EventKind.TOOL_CALL_OUTCOME_UNKNOWN: "outcome_unknown",
}
CAUSES = frozenset(
    {
        CAUSE_UNKNOWN,
        CAUSE_NONE,
        *(stop_causes.label(cause) for cause in StopCause),
    }
)
"""Every value of the `cause` label."""
TAKEOVER_OUTCOMES = ("resumed", "halted")
"""A takeover resumes the operation, or ends it when a stop was recorded while its owner was
dead."""
WRITE_PATHS = ("inline", "group_commit", "batch")
"""How a runner write reached the database: SQLite inline on the event loop or group-committed
on the database thread; PostgreSQL's pipelined batch."""
SQLITE_GROUP_COMMIT = "sqlite_group_commit"
POSTGRES_BATCH = "postgres_batch"
"""The `queue` label: which write queue a batch went through."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNFINISHED_STATUSES = tuple(status.value for status in OperationStatus if not status.is_terminal)
"""The statuses stopline_runtime_operations reports (always, 0 included): every one an
operation can still leave, so a status added later (WAITING) is counted without a change here."""
STATUS_COUNT_MAX_AGE_SECONDS = 1.0
"""The status counts are read from the database at most this often, however often scraped."""
STATUS_COUNT_WAIT_SECONDS = 2.0
"""How long a scrape waits for a fresh count before answering with the last one."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnfinishedCounts:
    """Operations not yet finished, in the whole database: by status, and how many of them any
    runner could claim now (PENDING and not held, or RUNNING with a lapsed lease)."""

    by_status: dict[str, int] = field(default_factory=dict)
    claimable: int = 0


class StorageMetrics:
    """Storage's own: built on the runtime's registry and handed to storage when it opens
    (open_storage), or on a registry of their own for a storage opened bare (tests, bench)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.write_seconds = Histogram(
            "stopline_runtime_storage_write_seconds",
            "A runner write (step boundary, output chunk, event) as its caller waited for it, "
            "queueing included, by path (inline, group_commit, batch).",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "stopline_runtime_storage_batch_seconds",
            "One batch of writes, from its start to its commit, by queue (sqlite_group_commit, "
            "postgres_batch).",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_writes = Histogram(
            "stopline_runtime_storage_batch_writes",
            "How many writes each batch carried in one transaction, by queue.",
            ["queue"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.call_seconds = Histogram(
            "stopline_runtime_storage_call_seconds",
            "Storage work run on the database threads (reads, claims, stops, lease renewals), "
            "by call.",
            ["call"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.unavailable = Counter(
            "stopline_runtime_storage_unavailable",
            "Storage calls that failed because the database could not be reached (connection "
            "refused or lost, pool exhausted).",
            registry=r,
        )
        self.write_path = {path: self.write_seconds.labels(path) for path in WRITE_PATHS}
        self._calls: dict[str, Histogram] = {}

    def batch(self, queue: str) -> Callable[[int, float], None]:
        """What a write queue calls after each batch: (writes, seconds)."""
        seconds = self.batch_seconds.labels(queue)
        writes = self.batch_writes.labels(queue)

        def observe(size: int, took: float) -> None:
            writes.observe(size)
            seconds.observe(took)

        return observe

    def call(self, name: str) -> Histogram:
        """The call's child, bound once per name (storage's own method names: a closed set)."""
        child = self._calls.get(name)
        if child is None:
            child = self._calls[name] = self.call_seconds.labels(name.lstrip("_"))
        return child


class EventCounts(Collector):
    """stopline_runtime_events_written{kind}: plain integers the runner adds to on the event
    loop (`counts[kind] += 1`), read when scraped. A Counter child's inc() is four calls and a
    lock per event, three events a step: at 10,000 running operations, tens of thousands of
    calls a second for a number read every few seconds. One thread writes (the event loop), so
    a scrape reads each count whole, at most a few events behind."""

    def __init__(self) -> None:
        self.counts: dict[EventKind, int] = dict.fromkeys(EventKind, 0)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for kind, count in list(self.counts.items()):
            family.add_metric([kind.value], count)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "stopline_runtime_events_written",
            "Events this runtime's runner wrote, by kind.",
            labels=["kind"],
        )


Source = tuple[asyncio.AbstractEventLoop, Callable[[], Awaitable[UnfinishedCounts]]]


class StoredOperations(Collector):
    """stopline_runtime_operations{status} and stopline_runtime_operations_pending, read from
    the database when scraped: one grouped count over the unfinished statuses (an index range on
    operations(status, ...), never the finished rows), at most once per max_age however many
    scrapes come, run on the runtime's event loop and storage threads while the scrape's own
    thread waits up to `wait` for it (then answers with the previous count). Nothing is read
    when nobody scrapes. The numbers are the whole database's, the same on every replica."""

    def __init__(
        self,
        max_age: float = STATUS_COUNT_MAX_AGE_SECONDS,
        wait: float = STATUS_COUNT_WAIT_SECONDS,
    ) -> None:
        self._max_age = max_age
        self._wait = wait
        self._counts = UnfinishedCounts()
        self._read_at = float("-inf")
        self._source: Source | None = None
        self._lock = threading.Lock()

    def bind(
        self, loop: asyncio.AbstractEventLoop, count: Callable[[], Awaitable[UnfinishedCounts]]
    ) -> None:
        self._source = (loop, count)

    def unbind(self) -> None:
        self._source = None

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        self._refresh()
        yield from self._families(self._counts)

    def _refresh(self) -> None:
        with self._lock:  # one count at a time; a second scrape reads what the first got
            source = self._source
            if source is None or time.monotonic() - self._read_at < self._max_age:
                return
            loop, count = source

            async def read() -> UnfinishedCounts:
                return await count()

            try:
                future = asyncio.run_coroutine_threadsafe(read(), loop)
            except RuntimeError:  # the loop is closed: the runtime is gone
                return
            try:
                self._counts = future.result(timeout=self._wait)
            except concurrent.futures.TimeoutError:
                future.cancel()
                log.debug("counting operations by status took over %ss", self._wait)
            except Exception as exc:  # the database unavailable: the last count stands
                log.debug("counting operations by status failed: %s", exc)
            self._read_at = time.monotonic()

    @staticmethod
    def _families(counts: UnfinishedCounts | None) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "stopline_runtime_operations",
            "Operations not yet finished in the database, by status (the whole database, the "
            "same on every replica: aggregate with max, not sum).",
            labels=["status"],
        )
        pending = GaugeMetricFamily(
            "stopline_runtime_operations_pending",
            "Operations a runner could claim now and none has: PENDING and not held, or "
            "RUNNING with a lapsed lease (the whole database).",
        )
        if counts is not None:
            statuses = dict.fromkeys(UNFINISHED_STATUSES, 0) | counts.by_status
            for status, number in statuses.items():
                by_status.add_metric([status], number)
            pending.add_metric([], counts.claimable)
        yield by_status
        yield pending


class RetentionMetrics:
    """Retention's deletions (runtime_service/retention.py), on the runtime's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "stopline_runtime_retention_events_deleted",
            "Events deleted by retention (of operations that ended longer ago than it).",
            registry=registry,
        )
        self.steps = Counter(
            "stopline_runtime_retention_step_records_deleted",
            "Step records (attempts) deleted by retention.",
            registry=registry,
        )
        self.operations = Counter(
            "stopline_runtime_retention_operations_expired",
            "Operations whose events retention expired (their rows stay).",
            registry=registry,
        )
        self.sweeps = Counter(
            "stopline_runtime_retention_sweeps",
            "Retention sweeps by outcome: done, skipped (another replica's turn), failed.",
            ["outcome"],
            registry=registry,
        )


# The `channel` label of stopline_runtime_notifications_heard (notifications.py's channels).
NOTIFICATION_CHANNELS = ("stops", "events", "work")


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.retention = RetentionMetrics(r)
        self.grpc = GrpcMetrics(
            r,
            "stopline_runtime",
            method_names(runtime_service_pb2.DESCRIPTOR.services_by_name.values()),
        )
        self.stop_to_cancelled = Histogram(
            "stopline_runtime_stop_step_cancelled_seconds",
            "From the moment the runner learned of a stop to the cancellation of the step it cut.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stop_to_interrupted = Histogram(
            "stopline_runtime_stop_interrupted_seconds",
            "From the moment the runner learned of a stop to its interrupted event being written.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stops_recorded = Counter(
            "stopline_runtime_stops_recorded",
            "Stops this replica recorded for an unfinished operation, by whether its own runner "
            "runs it (false: another replica's runner hears of it by notification, or nobody "
            "runs it yet). Many false with several replicas: see --advertise-address.",
            ["runs_here"],
            registry=r,
        )
        heard = Counter(
            "stopline_runtime_notifications_heard",
            "PostgreSQL notifications this replica received, by channel: stops, work, and the "
            "events of operations on the channels of those watched here.",
            ["channel"],
            registry=r,
        )
        self.notifications_heard = {
            channel: heard.labels(channel) for channel in NOTIFICATION_CHANNELS
        }
        self.finished = Counter(
            "stopline_runtime_operations_finished",
            "Operations this runtime ended, by agent, terminal status and stop cause.",
            ["agent", "status", "cause"],
            registry=r,
        )
        self.started = Counter(
            "stopline_runtime_operations_started",
            "Operations this runtime began running (claimed new, or resumed after a takeover), "
            "by agent.",
            ["agent"],
            registry=r,
        )
        self.deltas_per_event = Histogram(
            "stopline_runtime_deltas_per_text_delta_event",
            "How many delta() calls (tokens, for the llm agent) each text_delta event coalesced.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.tool_calls = Counter(
            "stopline_runtime_tool_calls",
            "Tool calls settled, by outcome (finished, failed, cancelled, outcome_unknown).",
            ["outcome"],
            registry=r,
        )
        self.steps = Histogram(
            "stopline_runtime_step_seconds",
            "How long an agent's step ran (to its return, or to the stop that cut it), by agent.",
            ["agent"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events = EventCounts()
        r.register(self.events)
        self.running = Gauge(
            "stopline_runtime_operations_running",
            "Operations this runtime is running now.",
            registry=r,
        )

        self.takeovers = Counter(
            "stopline_runtime_lease_takeovers",
            "Operations this runtime took over after their owner's lease lapsed, by outcome "
            "(resumed; halted: a stop had been recorded meanwhile).",
            ["outcome"],
            registry=r,
        )
        self.storage = StorageMetrics(r)
        self.stored = StoredOperations()
        r.register(self.stored)
        # Bound once: the runner updates these per event (and self.events.counts).
        self.tool_outcome = {
            kind: self.tool_calls.labels(outcome) for kind, outcome in TOOL_OUTCOMES.items()
        }
        self.takeover = {outcome: self.takeovers.labels(outcome) for outcome in TAKEOVER_OUTCOMES}

    def count_running(self, count: Callable[[], int]) -> None:
        """Read at scrape time (on the scrape's thread): a length read, never a lock or I/O."""
        self.running.set_function(lambda: float(count()))
