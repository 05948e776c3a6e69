"""The services' span path (stopline/span_export.py, stopline/otlp_wire.py): light step spans,
records, the wire encoder checked against the OpenTelemetry exporter's own, and the export
process end to end against an OTLP/gRPC receiver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from stopline import otlp_wire, span_export, tracing

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install(exporter)
    try:
        yield exporter
    finally:
        tracing.uninstall()


def test_a_light_child_span_is_a_real_child_and_parents_spans_made_under_it(
    exported: InMemorySpanExporter,
) -> None:
    with tracing.tracer().start_as_current_span("operation") as run:
        step = tracing.child_span("step", {"stopline.step": 3})
        assert isinstance(step, span_export.LightSpan)
        with (
            trace.use_span(step, end_on_exit=False),
            tracing.tracer().start_as_current_span("tool call"),
        ):
            pass
        step.add_event("stop received", {"stopline.stop_cause": "user"})
        step.add_link(run.get_span_context(), {"stopline.link": "x"})
        step.set_attribute("stopline.step.outcome", "stopped")
        step.set_status(StatusCode.ERROR, "cut")
        step.end()
        step.end()  # once only
        assert not step.is_recording()
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert sorted(spans) == ["operation", "step", "tool call"]
    op, made, tool = spans["operation"], spans["step"], spans["tool call"]
    assert made.parent is not None and made.parent.span_id == op.context.span_id
    assert made.context.trace_id == op.context.trace_id
    assert tool.parent is not None and tool.parent.span_id == made.context.span_id
    assert dict(made.attributes or {}) == {"stopline.step": 3, "stopline.step.outcome": "stopped"}
    assert [e.name for e in made.events] == ["stop received"]
    assert [link.context.span_id for link in made.links] == [op.context.span_id]
    assert made.status.status_code is StatusCode.ERROR and made.status.description == "cut"
    assert made.start_time is not None and made.end_time is not None
    assert made.start_time <= made.end_time


def test_without_a_recorded_parent_a_child_span_is_not_light(
    exported: InMemorySpanExporter,
) -> None:
    assert not isinstance(tracing.child_span("step", {}), span_export.LightSpan)
    tracing.uninstall()
    assert not tracing.child_span("step", {}).is_recording()


def _varied_spans() -> list[ReadableSpan]:
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    remote = SpanContext(trace_id, 0x00F067AA0BA902B7, True, TraceFlags(1))
    local = SpanContext(
        trace_id, 0x1111111111111111, False, TraceFlags(1), TraceState([("k", "v")])
    )
    values: dict[str, Any] = {
        "s": "text é",
        "empty": "",
        "t": True,
        "f": False,
        "i": 7,
        "zero": 0,
        "neg": -5,
        "big": 2**62,
        "x": 1.5,
        "strs": ("a", "b"),
        "ints": [1, 2],
    }
    exporter = InMemorySpanExporter()
    tracing.install(exporter, service_name="wire-test")
    try:
        tracer = tracing.tracer()
        with tracer.start_as_current_span(
            "server call", context=trace.set_span_in_context(trace.NonRecordingSpan(remote))
        ) as server:
            server.set_attributes(values)
            server.add_link(local, {"why": "x"})
            server.add_link(remote)
            server.add_event("event", {"e": 1}, timestamp=123)
            server.add_event("bare")
            server.set_status(StatusCode.ERROR, "bad")
            with tracer.start_as_current_span("client", kind=SpanKind.CLIENT):
                pass
            step = tracing.child_span("step", {"stopline.step": 1})
            step.set_status(StatusCode.OK)
            step.end()
        spans = list(exporter.get_finished_spans())
    finally:
        tracing.uninstall()
    return spans


def test_the_wire_encoder_writes_what_the_otlp_exporters_encoder_does() -> None:
    spans = _varied_spans()
    assert {s.name for s in spans} == {"server call", "client", "step"}
    resource = spans[0].resource
    records = [span_export.record_of(s) for s in spans]
    # Through records and back: the SDK's encoder sees the same spans.
    assert encode_spans([span_export.readable_span(r, resource) for r in records]) == (
        encode_spans(spans)
    )
    ours = ts.ExportTraceServiceRequest.FromString(
        otlp_wire.request(records, dict(resource.attributes), resource.schema_url)
    )
    assert ours == encode_spans(spans)


class _Receiver(ts_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ts.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request: ts.ExportTraceServiceRequest, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
        return ts.ExportTraceServiceResponse()


@pytest.mark.parametrize("protocol", ["grpc", "console"])
def test_a_service_exports_through_its_export_process(protocol: str) -> None:
    """configure_from_env(export_process=True) in a fresh interpreter: an operation span with
    light step spans under it, flushed, reach an OTLP/gRPC receiver (or the console) as one
    tree, and shutdown waits for the child."""
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    code = textwrap.dedent(
        """
        import json
        from opentelemetry import trace
        from stopline import tracing
        from stopline.span_export import LightSpan

        assert tracing.configure_from_env("stopline-export-test", export_process=True)
        with tracing.tracer().start_as_current_span("operation") as run:
            steps = [tracing.child_span("step", {"stopline.step": i}) for i in range(3)]
            for step in steps:
                step.end()
        flushed = tracing.provider().force_flush()
        import os, psutil
        niceness = [child.nice() for child in psutil.Process().children()]
        policies = [os.sched_getscheduler(child.pid) for child in psutil.Process().children()]
        tracing.shutdown()
        print(json.dumps({
            "light": all(isinstance(s, LightSpan) for s in steps),
            "flushed": flushed,
            "run": format(run.get_span_context().span_id, "016x"),
            "niceness": niceness,
            "own": os.nice(0),
            "idle": [policy == os.SCHED_IDLE for policy in policies],
        }))
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    if protocol == "grpc":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        env["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    else:
        env["OTEL_TRACES_EXPORTER"] = "console"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            cwd=REPO,
        )
    finally:
        server.stop(None)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.splitlines()[-1])
    assert facts["light"] and facts["flushed"], facts
    # The export process yields the cores to its service (a stop, a step) when they are busy.
    wanted = min(19, facts["own"] + span_export.EXPORT_NICENESS)
    assert facts["niceness"] == [wanted], facts
    assert facts["idle"] == [True], facts  # Linux: CPU time only when no ordinary task wants it
    if protocol == "console":
        assert done.stdout.count('"name": "step"') == 3, done.stdout
        return
    spans = [
        span
        for request in receiver.requests
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    services = {
        a.value.string_value
        for request in receiver.requests
        for rs in request.resource_spans
        for a in rs.resource.attributes
        if a.key == "service.name"
    }
    assert services == {"stopline-export-test"}
    run = next(s for s in spans if s.name == "operation")
    steps = [s for s in spans if s.name == "step"]
    assert run.span_id.hex() == facts["run"]
    assert len(steps) == 3
    assert all(s.parent_span_id == run.span_id and s.trace_id == run.trace_id for s in steps)
    assert sorted(s.attributes[0].value.int_value for s in steps) == [0, 1, 2]
