"""The gateway's Prometheus metrics, each defined once here (name, help, labels).

Labels come from closed sets (whether a stop was acknowledged as delivered, delivery outcomes);
never an operation id or a principal.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from stopline.gateway.v1 import gateway_service_pb2
from stopline.metrics import LATENCY_BUCKETS, GrpcMetrics, method_names


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
