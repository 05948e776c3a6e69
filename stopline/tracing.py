"""OpenTelemetry tracing for both services and the command line: switching it on, and carrying
the W3C trace context over gRPC.

Off unless the standard `OTEL_*` variables ask for it (`configure_from_env`): with
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set, or OTEL_TRACES_EXPORTER
naming an exporter (`otlp`, `console`), an SDK TracerProvider is installed with a batching OTLP
exporter (OTEL_EXPORTER_OTLP_PROTOCOL picks gRPC or HTTP; endpoint, headers, sampler, resource and
batch sizes are read by the SDK itself). OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none keep
it off. Off, nothing is installed: `tracer()` is OpenTelemetry's no-op tracer (a span costs a
context switch, no allocation of span data, no export), the gRPC interceptors are not added to
servers or channels, and no `traceparent` is sent.

Spans are made through `tracer()`, not the API's global provider, so tests and benchmarks can
switch tracing on and off in one process (`install`, `uninstall`); `configure_from_env` also sets
the global provider, so an agent's own OpenTelemetry spans join the operation's trace.

Context crosses processes as gRPC metadata (`traceparent`, `tracestate`, by the propagators of
OTEL_PROPAGATORS, W3C trace context by default): `TracingServerInterceptor` continues it on the
servers, `client_interceptors` (the command line) and `outgoing_metadata` (the gateway's calls to
the runtime, per call: an aio client interceptor costs ~150 µs per call) send it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from stopline.handlers import Handler, WrappedHandlers, with_behaviour
from stopline.otel_exporters import check_exporter, exporter_names, new_exporter

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from stopline.span_export import LightSpan, Sink

log = logging.getLogger(__name__)

TRACER_NAME = "stopline"
TRACEPARENT = "traceparent"
MAX_TRACEPARENT = 55
"""Characters of a version-00 W3C traceparent, as stored with an operation."""


UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Server methods without spans: probes (the gateway checks the runtime every few seconds) would
fill a trace store with one-span traces that say nothing."""

# Server span status ERROR only for codes that mean the server failed (OpenTelemetry's RPC
# semantic conventions): a caller's mistake (NOT_FOUND, INVALID_ARGUMENT...) is not an error here.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _State:
    provider: TracerProvider | None = None
    tracer: trace.Tracer = trace.NoOpTracer()
    sink: Sink | None = None
    """Where a `child_span`'s record goes when it ends; None: child spans are the SDK's."""
    light: type[LightSpan] | None = None


def enabled() -> bool:
    """Whether spans are recorded and exported (an SDK provider is installed)."""
    return _State.provider is not None


def tracer() -> trace.Tracer:
    return _State.tracer


def provider() -> TracerProvider | None:
    return _State.provider


# ---------------------------------------------------------------------------- switching it on


def configure_from_env(
    service_name: str, env: Mapping[str, str] | None = None, *, export_process: bool = False
) -> bool:
    """Install an SDK provider exporting as the `OTEL_*` variables say; False (and nothing
    installed) when they say nothing. ValueError names a variable with an unsupported value.
    `service_name` is the default of OTEL_SERVICE_NAME.

    `export_process` (the services): spans are encoded and exported by a child process
    (stopline/span_export.py), off the service's GIL, and steps' spans are light ones. Off (the
    command line, whose few spans do not pay for a process): the SDK's BatchSpanProcessor."""
    env = os.environ if env is None else env
    names = exporter_names(env)
    if not names:
        return False
    for name in names:
        check_exporter(name, env)
    sdk_provider = _new_provider(service_name)
    sink: Sink | None = None
    if export_process:
        from stopline.span_export import ProcessExport

        processor = ProcessExport(sdk_provider.resource, env)
        sdk_provider.add_span_processor(processor)
        sink = processor.sink
    else:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        for name in names:
            sdk_provider.add_span_processor(BatchSpanProcessor(new_exporter(name, env)))
    _use(sdk_provider, sink)
    # Also the global one (settable once per process), so agents' own spans join the trace.
    trace.set_tracer_provider(sdk_provider)
    return True


def install(
    exporter: SpanExporter | None = None, service_name: str = "stopline", *, batch: bool = False
) -> TracerProvider:
    """Switch tracing on in this process (tests, benchmarks). `exporter` None: spans are
    recorded, batched and dropped (the whole cost of tracing but the network), which is what a
    benchmark of tracing on vs off compares. `batch` False exports each span as it ends (tests
    read an InMemorySpanExporter at once). Undo with `uninstall`."""
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class _Dropping(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sdk_provider = _new_provider(service_name)
    chosen = exporter if exporter is not None else _Dropping()
    use_batch = batch or exporter is None
    processor = BatchSpanProcessor(chosen) if use_batch else SimpleSpanProcessor(chosen)
    sdk_provider.add_span_processor(processor)
    _use(sdk_provider, _in_process_sink(sdk_provider))
    return sdk_provider


def _in_process_sink(sdk_provider: TracerProvider) -> Sink:
    """Light spans handed to the provider's own processors, as SDK spans (tests, benchmarks)."""
    from stopline.span_export import readable_span

    processor = sdk_provider._active_span_processor
    resource = sdk_provider.resource

    def sink(record: Any) -> None:
        processor.on_end(readable_span(record, resource))

    return sink


def uninstall() -> None:
    """Back to off, after exporting what is buffered."""
    old = _State.provider
    _State.provider = None
    _State.tracer = trace.NoOpTracer()
    _State.sink = None
    if old is not None:
        old.shutdown()


def shutdown() -> None:
    """At process exit: export what is buffered (the batch processor sends every few seconds)."""
    if _State.provider is not None:
        _State.provider.shutdown()


def _new_provider(service_name: str) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win.
    return TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))


def _use(sdk_provider: TracerProvider, sink: Sink | None) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased

    if _State.provider is not None and _State.provider is not sdk_provider:
        _State.provider.shutdown()
    _State.provider = sdk_provider
    _State.tracer = sdk_provider.get_tracer(TRACER_NAME)
    # Light child spans follow their parent's sampling decision: what a parent-based sampler
    # (the default, and every parentbased_* of OTEL_TRACES_SAMPLER) decides. Any other sampler
    # decides for each span: those stay the SDK's.
    _State.sink = sink if isinstance(sdk_provider.sampler, ParentBased) else None
    if _State.sink is not None:
        from stopline.span_export import LightSpan

        _State.light = LightSpan


_SCOPE = (TRACER_NAME, None)


def child_span(
    name: str,
    attributes: dict[str, Any],
    context: otel_context.Context | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> trace.Span:
    """A span child of the current one (or of the span in `context`, e.g. a caller's, from
    its trace context), for work on the hot paths (an operation's steps, a stop's hops): a
    `span_export.LightSpan` when that parent is sampled, the tracer's span otherwise (a root,
    decided by the sampler; the no-op one when tracing is off). Not made current: use
    `trace.use_span`. `attributes`: plain values under known keys (the light span does not
    check them)."""
    sink, light = _State.sink, _State.light
    if sink is not None and light is not None:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid and parent.trace_flags.sampled:
            return light(name, parent, attributes, sink, _SCOPE, kind)
    return _State.tracer.start_span(name, context=context, kind=kind, attributes=attributes)


# ---------------------------------------------------------------------------- context


def context_with_span(span: trace.Span) -> contextvars.Context | None:
    """A copy of the current context with `span` current, to run a task in (what
    `trace.use_span` around `create_task` gives, for less); None (the task copies the current
    context itself) when tracing is off."""
    if _State.provider is None:
        return None
    context = contextvars.copy_context()
    context.run(otel_context.attach, trace.set_span_in_context(span))
    return context


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with work that runs later (an
    operation's runs); None when tracing is off or there is no span."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    value = carrier.get(TRACEPARENT)
    return value if value is not None and len(value) <= MAX_TRACEPARENT else None


def context_from_traceparent(traceparent: str | None) -> otel_context.Context | None:
    """The context a stored traceparent names (a parent for spans begun now); None without one."""
    if not traceparent:
        return None
    return propagate.extract({TRACEPARENT: traceparent})


def outgoing_metadata(
    metadata: Sequence[tuple[str, str]] | None,
) -> Sequence[tuple[str, str]] | None:
    """`metadata` plus the current trace context (when tracing is on and a span is current)."""
    if not enabled():
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


def _metadata_getter(metadata: Any) -> dict[str, str]:
    """gRPC metadata as the propagators' carrier (text values only; keys are lower case)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}


class TracingServerInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """One SERVER span per call (`package.Service/Method`, with the rpc.* attributes), a child of
    the caller's span when the call carries a trace context, current while the handler runs (so
    the handler's own spans, logs and outgoing calls belong to it). Put it before the others, so
    the calls they refuse have spans too."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        cached = self._wrapped.get(method, handler)
        if cached is not None:
            return cached
        traced = with_behaviour(handler, partial(_traced, method))
        return self._wrapped.keep(method, handler, traced)


def _traced(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    name = method.lstrip("/")
    service, _, rpc_method = name.partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc_method}

    # Plain begin and finish rather than a context manager and `trace.use_span`: this runs on
    # every call of both services (a stop's acknowledgment crosses two), and their generator
    # and exception plumbing cost more than the span itself.
    def begin(context: aio.ServicerContext[Any, Any]) -> tuple[trace.Span, object]:
        parent = propagate.extract(_metadata_getter(context.invocation_metadata()))
        current = child_span(name, dict(attributes), parent, trace.SpanKind.SERVER)
        return current, otel_context.attach(trace.set_span_in_context(current))

    def finish(
        current: trace.Span,
        token: object,
        context: aio.ServicerContext[Any, Any],
        error: BaseException | None,
    ) -> None:
        try:
            _end(current, context, error)
            current.end()
        finally:
            otel_context.detach(token)  # type: ignore[arg-type]

    if inspect.isasyncgenfunction(behaviour):

        async def traced_stream(request: Any, context: Any) -> AsyncGenerator[Any, None]:
            # The call's own task runs every resumption of this generator, so the span stays
            # current for the handler across its yields.
            current, token = begin(context)
            error: BaseException | None = None
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(current, token, context, error)

        return traced_stream

    async def traced(request: Any, context: Any) -> Any:
        current, token = begin(context)
        error: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish(current, token, context, error)

    return traced


def _end(
    span: trace.Span, context: aio.ServicerContext[Any, Any], error: BaseException | None
) -> None:
    code = context.code()
    status: grpc.StatusCode | None = code if isinstance(code, grpc.StatusCode) else None
    if status is None and isinstance(code, int):
        status = next((s for s in grpc.StatusCode if s.value[0] == code), None)
    if status is None:
        if isinstance(error, asyncio.CancelledError):
            status = grpc.StatusCode.CANCELLED
        elif error is not None:
            status = grpc.StatusCode.UNKNOWN
        else:
            status = grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", status.value[0])
    if status in _SERVER_ERRORS:
        span.set_status(trace.StatusCode.ERROR, status.name)


# ---------------------------------------------------------------------------- client side


class _Inject:
    @staticmethod
    def _details(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return details
        metadata = aio.Metadata(*(details.metadata or ()))
        for key, value in carrier.items():
            metadata.add(key, value)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


if TYPE_CHECKING:  # generic in the stubs only
    _UU = aio.UnaryUnaryClientInterceptor[Any, Any]
    _US = aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _UU = aio.UnaryUnaryClientInterceptor
    _US = aio.UnaryStreamClientInterceptor


class _UnaryUnaryInject(_Inject, _UU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamInject(_Inject, _US):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def client_interceptors() -> list[Any]:
    """For a client's channel (the command line's): every call carries the caller's trace
    context. Empty when tracing is off, so the channel has no interceptor to pay for."""
    if not enabled():
        return []
    return [_UnaryUnaryInject(), _UnaryStreamInject()]


def server_interceptors() -> list[aio.ServerInterceptor]:  # type: ignore[type-arg]
    """For a server: its calls' spans. Empty when tracing is off."""
    return [TracingServerInterceptor()] if enabled() else []
