"""The gateway's Prometheus metrics, each defined once here (name, help, labels).

Labels come from closed sets (whether a stop was acknowledged as delivered, delivery outcomes);
never an operation id or a principal.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway_service.auth import REFUSAL_KINDS
from stopline.gateway.v1 import gateway_service_pb2
from stopline.metrics import LATENCY_BUCKETS, GrpcMetrics, method_names

DELIVERY_OUTCOMES = ("delivered", "rejected", "undelivered")
"""The outcomes of a stop's delivery shown from the start (`pending` appears only when the
gateway closes with deliveries still running)."""


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.grpc = GrpcMetrics(
            r,
            "stopline_gateway",
            method_names(gateway_service_pb2.DESCRIPTOR.services_by_name.values()),
        )
        self.stop_ack = Histogram(
            "stopline_gateway_stop_ack_seconds",
            "A StopOperation call, from its arrival to its answer; delivered: whether the runtime "
            "had confirmed the stop by then.",
            ["delivered"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery = Histogram(
            "stopline_gateway_stop_delivery_seconds",
            "A stop's delivery to the runtime, from its start to its end, by outcome (delivered, "
            "rejected, undelivered).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.client_stop = Histogram(
            "stopline_gateway_stop_seen_by_client_seconds",
            "The whole stop as a client saw it: from the gateway accepting a StopOperation to the "
            "terminal event forwarded on a stream of that operation (once per such stream).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_lag = Histogram(
            "stopline_gateway_stream_lag_seconds",
            "Per event sent on a client stream: from the event's stored time on the runtime (or "
            "the stream's opening, for an older event replayed) to the client's stream taking "
            "it. Runtime and gateway clocks both count: keep them in sync (NTP).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "stopline_gateway_stop_deliveries_pending",
            "Stops accepted and not yet delivered to (or refused by) the runtime.",
            registry=r,
        )
        self.open_streams = Gauge(
            "stopline_gateway_open_streams",
            "Client streams (StartAndStream, StreamOperation) open now.",
            registry=r,
        )
        self.auth_failures = Counter(
            "stopline_gateway_auth_failures",
            "Calls refused for their credentials, by kind (no_credentials, api_key, "
            "jwt_not_accepted, jwt_expired, jwt_invalid).",
            ["kind"],
            registry=r,
        )
        self.delivery_calls = Counter(
            "stopline_gateway_stop_delivery_calls",
            "InterruptOperation calls sent to deliver stops (a retried or hedged delivery sends "
            "more than one).",
            registry=r,
        )
        self.delivery_retries = Counter(
            "stopline_gateway_stop_delivery_retries",
            "Delivery attempts after a stop's first (each after a retryable failure).",
            registry=r,
        )

        # Every series of a closed label set from the start, at 0: a rate() sees the first one.
        for kind in REFUSAL_KINDS:
            self.auth_failures.labels(kind)
        for outcome in DELIVERY_OUTCOMES:
            self.delivery.labels(outcome)
        for delivered in ("true", "false"):
            self.stop_ack.labels(delivered)

    def count_pending(self, count: Callable[[], int]) -> None:
        """Gauges read at scrape time on the scrape's thread: a length or int read, no lock."""
        self.pending.set_function(lambda: float(count()))

    def count_open_streams(self, count: Callable[[], int]) -> None:
        self.open_streams.set_function(lambda: float(count()))

    def count_auth_failure(self, kind: str) -> None:
        self.auth_failures.labels(kind).inc()
