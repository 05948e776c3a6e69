"""The runtime's Prometheus metrics, each defined once here (name, help, labels).

Label values come from closed sets: agent names (those registered with this runtime), event kinds,
terminal statuses and the stop causes below; never an operation id or a principal.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime_service import stop_causes
from runtime_service.domain import StopCause
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


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.events = Counter(
            "stopline_runtime_events_written",
            "Events this runtime's runner wrote, by kind.",
            ["kind"],
            registry=r,
        )
        self.running = Gauge(
            "stopline_runtime_operations_running",
            "Operations this runtime is running now.",
            registry=r,
        )

    def count_running(self, count: Callable[[], int]) -> None:
        """Read at scrape time (on the scrape's thread): a length read, never a lock or I/O."""
        self.running.set_function(lambda: float(count()))


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
