"""Gateway settings. The CLI fills these from flags and STOPLINE_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway_service.auth import AuthSettings
from gateway_service.runtime_link import LoadBalancing
from stopline.limits import (
    DEFAULT_MAX_INPUT_BYTES,
    DEFAULT_MAX_PAGE_SIZE,
    DEFAULT_MAX_REQUEST_BYTES,
)
from stopline.transport import (
    DEFAULT_GATEWAY_ADDRESS,
    DEFAULT_RUNTIME_ADDRESS,
    ClientTLS,
    ServerTLS,
)


@dataclass(frozen=True)
class GatewayConfig:
    address: str = DEFAULT_GATEWAY_ADDRESS
    # host:port of the Prometheus metrics endpoint; None: not served.
    metrics_address: str | None = None
    # One runtime, or several: `ipv4:10.0.0.5:50051,10.0.0.6:50051`, `dns:///runtimes:50051`.
    runtime_address: str = DEFAULT_RUNTIME_ADDRESS
    # How calls are spread over the runtime addresses. round_robin: the next replica each call
    # (with one address it behaves like pick_first).
    runtime_load_balancing: LoadBalancing = LoadBalancing.ROUND_ROBIN
    # How often the gateway asks whether a runtime answers (its health for GatewayService
    # follows), and how long it waits for the answer.
    readiness_interval_seconds: float = 1.0
    readiness_timeout_seconds: float = 1.0
    # StopOperation answers after one round trip to the runtime, or after this bound with
    # "accepted, still being delivered".
    stop_ack_seconds: float = 0.25
    # How long a stop is retried while the runtime is unreachable before it is reported undelivered.
    stop_delivery_deadline_seconds: float = 30.0
    # How long a start is retried (same idempotency key) while the runtime is unreachable.
    start_retry_seconds: float = 5.0
    # How long the runtime holds a new operation before running it, unless the gateway releases
    # (or stops) it first; bounds the damage if the gateway dies between start and release.
    start_hold_seconds: float = 10.0
    # A stream whose runtime watch keeps failing for this long ends with UNAVAILABLE (the client
    # reconnects with its last seq).
    watch_reconnect_deadline_seconds: float = 60.0
    # Timeout of unary calls to the runtime.
    rpc_timeout_seconds: float = 10.0
    default_cancel_grace_seconds: float = 30.0
    max_cancel_grace_seconds: float = 24 * 3600.0
    shutdown_grace_seconds: float = 5.0
    # Limits (stopline/limits.py). The gateway checks input size and page size itself, so an
    # oversized request never costs a runtime round trip.
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_page_size: int = DEFAULT_MAX_PAGE_SIZE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Open StartAndStream + StreamOperation calls on this process; more answer RESOURCE_EXHAUSTED.
    max_streams: int = 1000
    # Per caller, once authentication gives calls a principal (None: only max_streams applies).
    max_streams_per_principal: int | None = None
    # Operations one principal may have pending, running or stopping (counted on the runtime, so
    # across gateways); a start over it answers RESOURCE_EXHAUSTED. None: no limit.
    max_running_per_principal: int | None = None
    # A stream with nothing to send for this long ends with DEADLINE_EXCEEDED and a reconnect hint
    # (after_seq=N), freeing its slot; 0 turns the limit off.
    stream_idle_seconds: float = 900.0
    # Who may call: API keys and/or JWTs. The gateway refuses to start with neither.
    auth: AuthSettings = field(default_factory=AuthSettings)
    # Serve clients over TLS (with client_ca_file: require client certificates too).
    tls: ServerTLS | None = None
    # The credential sent to the runtime with every call, and TLS towards it.
    service_token: str | None = None
    runtime_tls: ClientTLS | None = None
    reflection: bool = True
    # Operation owners remembered, so a stop by the owner needs no extra runtime read.
    owner_cache_size: int = 100_000
