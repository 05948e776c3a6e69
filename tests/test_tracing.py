"""Traces and logs of one start-and-stop through the gateway and the runtime, in process: the
Python client the `stopline` command uses starts the `llm` agent against the local model server
and stops it mid-answer (its Ctrl-C path). The spans, kept in memory, form one tree from the
client's span to the model request's span; the stop's call links to the step it cut; the JSON
log lines of the run carry its operation id and trace id. With no OTEL_* variables, tracing is
off: no SDK provider, no interceptors, nothing stored or sent."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fake_llm import FakeLLM
from fake_llm.script import TextTurn
from fake_llm.server import ServerConfig
from gateway_service.server import start_gateway
from runtime_service.server import start_runtime
from stopline import logs, otel_exporters, tracing
from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.render import EXIT_INTERRUPTED
from stopline_cli import client
from tests.conftest import eventually, runtime_config
from tests.credentials import PRINCIPAL, TOKEN
from tests.test_gateway import gateway_config
from tests.test_llm_e2e import ANSWER, API_KEY, USER, llm_settings

START = "stopline.v1.RuntimeService/StartAndWatchOperation"
INTERRUPT = "stopline.v1.RuntimeService/InterruptOperation"
START_AND_STREAM = "stopline.gateway.v1.GatewayService/StartAndStream"
STOP = "stopline.gateway.v1.GatewayService/StopOperation"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM(ServerConfig(tokens_per_second=0, api_key=API_KEY))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span kept in memory as it ends."""
    exporter = InMemorySpanExporter()
    tracing.install(exporter)
    try:
        yield exporter
    finally:
        tracing.uninstall()


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The services' log lines, as `--log-format json` writes them."""
    out = io.StringIO()
    handler = logs.handler(logs.JSON, out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def ancestry(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """The span's name, its parent's, ... up to the root."""
    names = [span.name]
    while span.parent is not None:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


async def test_a_start_and_stop_is_one_trace_and_its_log_lines_carry_it(
    db_url: str, fake: FakeLLM, spans: InMemorySpanExporter, json_lines: io.StringIO
) -> None:
    fake.set_script([TextTurn(text=ANSWER, tokens_per_second=20)])
    runtime = await start_runtime(runtime_config(db_url, llm=llm_settings(fake)))
    gateway = await start_gateway(gateway_config(runtime.address))
    try:
        request = pb.StartAndStreamRequest(agent="llm", idempotency_key="trace-test")
        request.input.update({"messages": [USER]})
        with client.command_span("stopline run", agent="llm"):
            async with client.connect(client.Target(gateway.address, TOKEN)) as channel:
                stub = pb_grpc.GatewayServiceStub(channel)
                follower = client.Follower(stub, as_json=True, idempotency_key="trace-test")

                async def ctrl_c_mid_answer() -> None:
                    async def answering() -> bool:
                        return any(r.tokens_sent >= 3 for r in fake.requests)

                    await eventually(answering, timeout=20)
                    follower.on_ctrl_c()

                pressing = asyncio.create_task(ctrl_c_mid_answer())
                status = await follower.follow(lambda: stub.StartAndStream(request))
                await pressing
        assert status == EXIT_INTERRUPTED
        [model_call] = fake.requests
        assert model_call.outcome == "client_closed"

        async def run_ended() -> bool:
            return any(span.name == "operation" for span in spans.get_finished_spans())

        await eventually(run_ended)
    finally:
        await gateway.stop(grace=0)
        await runtime.stop(grace=0)

    finished = list(spans.get_finished_spans())
    by_id = {span.context.span_id: span for span in finished}
    # One trace, one root: the client's span.
    assert {span.context.trace_id for span in finished} == {finished[0].context.trace_id}
    trace_id = finished[0].context.trace_id
    assert [span.name for span in finished if span.parent is None] == ["stopline run"]

    # Client -> gateway -> runtime -> the operation's run -> its step -> the model request.
    llm_span = one(finished, "chat fake-model")
    assert ancestry(llm_span, by_id) == [
        "chat fake-model",
        "step",
        "operation",
        START,
        START_AND_STREAM,
        "stopline run",
    ]
    assert llm_span.kind is trace.SpanKind.CLIENT
    assert llm_span.attributes is not None
    assert llm_span.attributes["gen_ai.request.model"] == "fake-model"
    assert llm_span.attributes.get("stopline.cancelled") is True
    # The model server received the model request span's context.
    assert model_call.traceparent is not None
    assert model_call.traceparent.split("-")[1:3] == [
        format(trace_id, "032x"),
        format(llm_span.context.span_id, "016x"),
    ]

    step = one(finished, "step")
    operation = one(finished, "operation")
    assert step.attributes is not None and operation.attributes is not None
    assert step.attributes["stopline.step"] == 0
    assert step.attributes["stopline.step.outcome"] == "stopped"
    op_id = operation.attributes["stopline.operation_id"]
    assert operation.attributes["stopline.status"] == "interrupted"
    assert operation.attributes["stopline.stop_cause"] == "user"
    # No input, message or key among the attributes of any span.
    for span in finished:
        for value in (span.attributes or {}).values():
            assert USER["content"] not in str(value) and API_KEY not in str(value)

    # The stop: client -> gateway StopOperation -> its delivery -> the runtime's
    # InterruptOperation, which links to the step span it cut (and the step span back to it).
    interrupt = one(finished, INTERRUPT)
    assert ancestry(interrupt, by_id) == [
        INTERRUPT,
        "stop delivery",
        STOP,
        "stopline run",
    ]
    assert [(link.context.span_id, dict(link.attributes or {})) for link in interrupt.links] == [
        (step.context.span_id, {"stopline.link": "stopped_step"})
    ]
    # And back, unless the step had ended before the call got to it (on PostgreSQL the stop's
    # notification may reach the runner first).
    assert [(link.context.span_id, dict(link.attributes or {})) for link in step.links] in (
        [(interrupt.context.span_id, {"stopline.link": "stopped_by"})],
        [],
    )
    assert [event.name for event in step.events] == ["stop received"]

    # The log lines about this operation carry its id and this trace's id.
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    ours = [line for line in lines if line.get("operation_id") == op_id]
    messages = [line["message"] for line in ours]
    for expected in ("start accepted", "operation started", "stop requested"):
        assert expected in messages, messages
    assert {line.get("trace_id") for line in ours} == {format(trace_id, "032x")}, ours
    [finished_line] = [line for line in ours if line["message"] == "operation finished"]
    assert finished_line["status"] == "interrupted" and finished_line["cause"] == "user"
    assert finished_line["mid_step"] is True and finished_line["halt_ms"] >= 0
    assert finished_line["principal"] == PRINCIPAL
    started_line = next(line for line in ours if line["message"] == "operation started")
    assert started_line["level"] == "INFO" and started_line["agent"] == "llm"
    assert "exception" not in finished_line


def test_without_otel_variables_nothing_is_installed_or_exported() -> None:
    """In a fresh interpreter with no OTEL_* variable: no SDK provider (the API's default
    proxy stays), no interceptors, no trace context sent or stored; and an operation runs."""
    code = textwrap.dedent(
        """
        import asyncio, json, os, tempfile
        from opentelemetry import trace
        from stopline import tracing
        from runtime_service.app import RuntimeApp
        from tests.conftest import runtime_config

        configured = tracing.configure_from_env("stopline-test")

        async def run():
            url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "t.db")
            app = await RuntimeApp.open(runtime_config(url))
            try:
                created = await app.operations.start("echo", {"message": "hi"}, "")
                with tracing.tracer().start_as_current_span("ignored") as span:
                    recording = span.is_recording()
                    traceparent = tracing.current_traceparent()
                return created.operation.trace_parent, recording, traceparent
            finally:
                await app.close()

        stored, recording, traceparent = asyncio.run(run())
        print(json.dumps({
            "configured": configured,
            "enabled": tracing.enabled(),
            "global": type(trace.get_tracer_provider()).__name__,
            "server": len(tracing.server_interceptors()),
            "client": len(tracing.client_interceptors()),
            "metadata": tracing.outgoing_metadata((("a", "b"),)) == (("a", "b"),),
            "stored": stored,
            "recording": recording,
            "traceparent": traceparent,
        }))
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "configured": False,
        "enabled": False,
        "global": "ProxyTracerProvider",
        "server": 0,
        "client": 0,
        "metadata": True,
        "stored": None,
        "recording": False,
        "traceparent": None,
    }


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
    ],
)
def test_the_standard_variables_decide_whether_spans_are_exported(
    env: dict[str, str], expected: list[str]
) -> None:
    assert otel_exporters.exporter_names(env) == expected


def test_an_otlp_endpoint_installs_a_batching_otlp_exporter() -> None:
    code = textwrap.dedent(
        """
        import json
        from opentelemetry import trace
        from stopline import tracing

        configured = tracing.configure_from_env("stopline-test")
        provider = tracing.provider()
        processors = provider._active_span_processor._span_processors
        print(json.dumps({
            "configured": configured,
            "global": trace.get_tracer_provider() is provider,
            "service": provider.resource.attributes["service.name"],
            "exporters": [type(p.span_exporter).__module__ for p in processors],
        }))
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "configured": True,
        "global": True,
        "service": "stopline-test",
        "exporters": ["opentelemetry.exporter.otlp.proto.http.trace_exporter"],
    }


def test_a_text_line_is_readable_and_carries_the_context() -> None:
    out = io.StringIO()
    logger = logging.getLogger("tests.test_tracing.text")
    logger.propagate = False
    logger.addHandler(logs.handler(logs.TEXT, out))
    logger.setLevel(logging.INFO)
    with logs.bound(operation_id="op-1", principal="alice"):
        logger.info("operation finished", extra=logs.fields(status="interrupted", halt_ms=2.5))
    line = out.getvalue().strip()
    assert line.endswith(
        "INFO tests.test_tracing.text: operation finished operation_id=op-1 principal=alice "
        "status=interrupted halt_ms=2.5"
    ), line


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger as the test found it, after a test that calls logs.configure."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    flags = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {flag: getattr(logging, flag) for flag in flags}
    try:
        yield
    finally:
        for flag, value in saved.items():
            setattr(logging, flag, value)
        logs._stop_writer()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


class _ThreadsWriting(io.StringIO):
    """A stream that records which thread wrote each line."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        return super().write(text)


def test_the_services_lines_are_written_by_a_thread_of_their_own_with_the_callers_context(
    monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    """logs.configure (what both services' CLIs call) queues a line for a writer thread, so
    formatting and writing it cost the event loop nothing on a stop's path; the line still
    carries the context of the code that logged it, and exit writes out what is queued."""
    stream = _ThreadsWriting()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure("INFO", logs.JSON)
    with logs.bound(operation_id="op-1", principal="alice"):
        logging.getLogger("stopline.test").info("hello %s", "world", extra=logs.fields(n=1))
    logs._stop_writer()  # what atexit runs
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["message"], x["operation_id"], x["principal"], x["n"]) for x in lines] == [
        ("hello world", "op-1", "alice", 1)
    ]
    assert threading.current_thread().name not in stream.writers
    # After exit's flush, a late line is written at once, by the code that logs it.
    logging.getLogger("stopline.test").info("late")
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "late"


class _StuckStream(io.StringIO):
    """A stderr that takes nothing until released (a log pipe that has backed up)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.release.wait(timeout=10)
        return super().write(text)


def test_a_stderr_that_takes_nothing_costs_lines_counted_not_memory_or_the_loop(
    monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    stream = _StuckStream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(logs, "MAX_QUEUED_LINES", 3)
    log = logging.getLogger("stopline.test")
    try:
        logs.configure("INFO", logs.TEXT)
        log.info("first")
        assert stream.writing.wait(timeout=10)  # the writer is stuck writing it
        for n in range(10):
            log.info("line %d", n)  # returns at once: queued (three) or dropped (seven)
        stream.release.set()
        logs._stop_writer()
        lines = stream.getvalue().splitlines()
        assert [line.split(": ", 1)[1] for line in lines] == [
            "first",
            "line 0",
            "line 1",
            "line 2",
            "7 log lines dropped: stderr did not take them as fast as they came",
        ]
    finally:
        stream.release.set()
