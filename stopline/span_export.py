"""Spans made cheap on the services' hot path: a light span for each step, and OTLP encoding and
export in a process of their own.

Why: with the SDK's BatchSpanProcessor the OTLP exporter encodes every span into protobuf in
pure Python (~100 µs a span on a small VM) on a thread of the service, holding the GIL against
the event loop; and the SDK's own span (sampler, bounded attributes, validation) costs tens of µs
to start and end. A SQLite step costs ~200 µs, so a span per step made tracing cost a third of
it. Here:

* `ProcessExport` is the services' span processor when OTLP is configured: an ended span becomes
  a tuple of plain values (`record_of`), queued; a thread sends the queue every
  OTEL_BSP_SCHEDULE_DELAY (or when OTEL_BSP_MAX_EXPORT_BATCH_SIZE are waiting) to a child
  process as one `marshal`led frame on a pipe (C code, and the write releases the GIL). The
  child (`python -m stopline.span_export`, started with exec, never a fork of a process running
  gRPC threads) rebuilds the SDK's ReadableSpans and hands them to the SDK's own
  BatchSpanProcessor and OTLP exporter, configured by the same `OTEL_*` variables it inherits.
* `LightSpan` is a step's span: a real span in the exported trace (its own span id, the run's
  span as parent, its attributes, events, links and status; the current span while the step
  runs, so tool calls and model requests are its children), whose start is a span id and a
  clock read and whose end queues its record directly, without the SDK's span machinery.
  It is used only where the SDK would record the span anyway (a sampled parent, the default
  parent-based sampler): see `tracing.child_span`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import marshal
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.util import types

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan

log = logging.getLogger(__name__)

Record = tuple[Any, ...]
"""A finished span as plain values (marshal-able): see `record_of`."""
Sink = Callable[[Record], None]

_FRAME = struct.Struct("<I")
EXPORT_NICENESS = 10
"""How much lower the export process's CPU priority is than its service's (see `main`)."""
_SPANS, _FLUSH = "spans", "flush"
MAGIC = "stopline-spans/1"


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, "") or default)
    except ValueError:
        return default


# ---------------------------------------------------------------------------- records


def record_of(span: ReadableSpan) -> Record:
    """An SDK span's data as plain values (in the order `LightSpan.record` makes them)."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    scope = span.instrumentation_scope
    return (
        span.name,
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        context.trace_state.to_header() if context.trace_state else "",
        parent.span_id if parent is not None else 0,
        bool(parent.is_remote) if parent is not None else False,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        [_link(link.context, link.attributes) for link in span.links],
        span.status.status_code.value,
        span.status.description,
        scope.name if scope is not None else "",
        scope.version if scope is not None else None,
    )


def _link(context: SpanContext, attributes: types.Attributes) -> tuple[Any, ...]:
    flags, remote = int(context.trace_flags), bool(context.is_remote)
    return (context.trace_id, context.span_id, flags, remote, dict(attributes or {}))


def readable_span(record: Record, resource: Resource) -> ReadableSpan:
    """The SDK's ReadableSpan a record describes (what exporters take)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    (
        name,
        trace_id,
        span_id,
        flags,
        state,
        parent_id,
        parent_remote,
        kind,
        start,
        end,
        attributes,
        events,
        links,
        code,
        description,
        scope_name,
        scope_version,
    ) = record
    trace_state = TraceState.from_header([state]) if state else None
    context = SpanContext(trace_id, span_id, False, TraceFlags(flags), trace_state)
    parent = (
        SpanContext(trace_id, parent_id, parent_remote, TraceFlags(flags), trace_state)
        if parent_id
        else None
    )
    return ReadableSpan(
        name=name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes,
        events=[Event(e_name, e_attributes, e_time) for e_name, e_time, e_attributes in events],
        links=[
            Link(SpanContext(l_trace, l_span, l_remote, TraceFlags(l_flags)), l_attributes)
            for l_trace, l_span, l_flags, l_remote, l_attributes in links
        ],
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=InstrumentationScope(scope_name, scope_version),
    )


# ---------------------------------------------------------------------------- the light span


class LightSpan(trace.Span):
    """A recorded span made without the SDK's span machinery (see the module docstring): the
    caller vouches for its attributes (a few known keys and plain values)."""

    def __init__(
        self,
        name: str,
        parent: SpanContext,
        attributes: dict[str, types.AttributeValue],
        sink: Sink,
        scope: tuple[str, str | None],
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> None:
        self._name = name
        self._kind = kind.value
        self._parent = parent
        self._context = SpanContext(
            parent.trace_id,
            random.getrandbits(64) or 1,
            False,
            parent.trace_flags,
            parent.trace_state,
        )
        self._attributes = attributes
        self._events: list[tuple[str, int, dict[str, Any]]] = []
        self._links: list[tuple[Any, ...]] = []
        self._status: tuple[int, str | None] = (StatusCode.UNSET.value, None)
        self._sink = sink
        self._scope = scope
        self._end: int | None = None
        self._start = time.time_ns()

    def record(self) -> Record:
        context, parent = self._context, self._parent
        state = context.trace_state
        return (
            self._name,
            context.trace_id,
            context.span_id,
            int(context.trace_flags),
            state.to_header() if state else "",
            parent.span_id,
            parent.is_remote,
            self._kind,
            self._start,
            self._end,
            self._attributes,
            self._events,
            self._links,
            *self._status,
            *self._scope,
        )

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else time.time_ns()
        self._sink(self.record())

    def get_span_context(self) -> SpanContext:
        return self._context

    @property
    def kind(self) -> SpanKind:
        """As the SDK's span has it (callers tell a server span from others by it)."""
        return SpanKind(self._kind)

    def is_recording(self) -> bool:
        return self._end is None

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end is None:
            self._attributes.update(attributes)

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end is None:
            self._attributes[key] = value

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end is None:
            stamp = timestamp if timestamp is not None else time.time_ns()
            self._events.append((name, stamp, dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end is None and context.is_valid:
            self._links.append(_link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end is not None:
            return
        if isinstance(status, Status):
            self._status = (status.status_code.value, status.description)
        else:
            self._status = (status.value, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        facts: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            **dict(attributes or {}),
        }
        self.add_event("exception", facts, timestamp)

    def __repr__(self) -> str:
        return f"LightSpan({self._name!r}, span_id={self._context.span_id:016x})"


# ---------------------------------------------------------------------------- the parent's side


class ProcessExport(SpanProcessor):
    """The span processor sending every ended span (the SDK's, and `LightSpan` records through
    `sink`) to the export process. Batching as the SDK's BatchSpanProcessor does (OTEL_BSP_*);
    a full queue drops the oldest; spans are lost, never the service, if the child dies."""

    def __init__(self, resource: Resource, env: Mapping[str, str]) -> None:
        self._delay = _env_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._batch = max(1, _env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
        self._queue: collections.deque[Any] = collections.deque(
            maxlen=max(self._batch, _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048))
        )
        acks_read, acks_write = os.pipe()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "stopline.span_export", str(acks_write)],
                stdin=subprocess.PIPE,
                pass_fds=(acks_write,),
                env=dict(env),
            )
        finally:
            os.close(acks_write)
        assert self._child.stdin is not None
        self._pipe: IO[bytes] = self._child.stdin
        self._acks = os.fdopen(acks_read, "rb", buffering=0)
        self._write_lock = threading.Lock()
        self._flushes = 0
        self._broken = False
        self._closed = False
        self._wake = threading.Event()
        self._send((MAGIC, dict(resource.attributes), resource.schema_url))
        self._thread = threading.Thread(target=self._work, name="stopline-span-export", daemon=True)
        self._thread.start()

    # what the spans call

    def sink(self, record: Record) -> None:
        """A LightSpan ended."""
        self._queue.append(record)
        if len(self._queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        """An SDK span ended: queued as is, made a record on the sending thread."""
        context = span.context
        if context is not None and context.trace_flags.sampled:
            self._queue.append(span)
            if len(self._queue) >= self._batch and not self._wake.is_set():
                self._wake.set()

    # sending

    def _work(self) -> None:
        while not self._closed:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        while self._queue:
            batch: list[Record] = []
            while self._queue and len(batch) < self._batch:
                item = self._queue.popleft()
                batch.append(item if isinstance(item, tuple) else record_of(item))
            self._send((_SPANS, batch))

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._broken:
            return
        payload = marshal.dumps(message)
        try:
            with self._write_lock:
                self._pipe.write(_FRAME.pack(len(payload)) + payload)
                self._pipe.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            self._broken = True
            log.warning("the span export process is gone (%s): spans are no longer exported", exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Send what is queued and wait until the child has exported it."""
        if self._broken or self._closed:
            return False
        self._drain()
        self._flushes += 1
        self._send((_FLUSH, self._flushes))
        return self._wait_ack(timeout_millis / 1000)

    def _wait_ack(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._broken:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._acks], [], [], left)[0]:
                return False
            line = self._acks.read(8)
            if not line:
                return False
            if struct.unpack("<Q", line)[0] >= self._flushes:
                return True
        return False

    def shutdown(self) -> None:
        """Send the rest, close the pipe, and wait for the child to export it and exit."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._drain()
        with contextlib.suppress(OSError):
            self._pipe.close()
        try:
            self._child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self._acks.close()


# ---------------------------------------------------------------------------- the child


def _read_frame(stream: IO[bytes]) -> Any:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return marshal.loads(payload)


class _Records(Protocol):
    def export(self, records: Sequence[Record]) -> Any: ...

    def shutdown(self) -> None: ...


def _otlp_grpc_records(resource: Resource) -> _Records:
    """The SDK's OTLP/gRPC exporter (configured by OTEL_*), fed records: each batch is encoded
    by stopline.otlp_wire instead of the SDK's per-object encoder."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from stopline import otlp_wire

    attributes, schema_url = dict(resource.attributes), resource.schema_url

    class RecordsExporter(OTLPSpanExporter):
        def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
            return ExportTraceServiceRequest.FromString(
                otlp_wire.request(data, attributes, schema_url)
            )

    return RecordsExporter()  # type: ignore[return-value]


def serve(stream: IO[bytes], acks: IO[bytes], env: Mapping[str, str]) -> None:
    """The child's loop: frames from the parent until it closes the pipe, then export the
    rest and return. OTLP over gRPC (the default) is fed records; any other exporter gets the
    SDK's ReadableSpans behind the SDK's own BatchSpanProcessor."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from stopline import otel_exporters

    header = _read_frame(stream)
    if not header or header[0] != MAGIC:
        raise SystemExit("stopline.span_export: not a span stream")
    resource = Resource(header[1], header[2])
    direct: list[_Records] = []
    processors: list[BatchSpanProcessor] = []
    for name in otel_exporters.exporter_names(env):
        if name == "otlp" and otel_exporters.otlp_protocol(env) == "grpc":
            direct.append(_otlp_grpc_records(resource))
        else:
            processors.append(BatchSpanProcessor(otel_exporters.new_exporter(name, env)))
    try:
        while (message := _read_frame(stream)) is not None:
            if message[0] == _SPANS:
                for exporter in direct:
                    exporter.export(message[1])
                if processors:
                    for record in message[1]:
                        span = readable_span(record, resource)
                        for processor in processors:
                            processor.on_end(span)
            elif message[0] == _FLUSH:
                for processor in processors:
                    processor.force_flush()
                acks.write(struct.pack("<Q", message[1]))
                acks.flush()
    finally:
        for processor in processors:
            processor.shutdown()  # type: ignore[no-untyped-call]
        for exporter in direct:
            exporter.shutdown()


def main() -> None:
    # The parent decides when to stop (it closes the pipe); a Ctrl-C reaching the whole
    # process group must not cut the export of what is still queued.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: every few seconds a burst of encoding and sending, which on a small
    # machine would otherwise take a core from the service it exports for just when a stop or
    # a step needs it. Lower priority costs the export only when the cores are busy: niceness
    # everywhere, and Linux's SCHED_IDLE where there is one (CPU time only when no ordinary
    # task wants it; a nice +10 task still took about a tenth of a busy core). Under sustained
    # full load the export falls behind and the parent's queue bound drops spans, as the SDK's
    # batch processor does when its exporter cannot keep up.
    os.nice(EXPORT_NICENESS)
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    acks = os.fdopen(int(sys.argv[1]), "wb", buffering=0)
    serve(sys.stdin.buffer, acks, os.environ)


if __name__ == "__main__":
    main()
