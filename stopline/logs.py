"""Structured log lines for both services: readable by default, one JSON object per line with
`--log-format json` (STOPLINE_LOG_FORMAT=json).

Every line carries, where known, the operation it concerns, the trace it belongs to and the
principal who asked. Those come from context variables, not from each call site: a runner's run
task binds its operation (and owner) for its whole life, a gRPC call's task binds its principal
(stopline.caller, set by stopline.authn) or the operation it is about, and the trace id is the
current OpenTelemetry span's (present when tracing is on). A call site adds the facts of its
event as fields:

    log.info("operation finished", extra=fields(status="INTERRUPTED", halt_ms=3.2))

Messages are short event names; the values are fields, so a log store can filter on them. A
stack trace goes with a line only where the code says so (`exc_info`): for bugs, never for
failures that are expected in operation (a refused credential, an unreachable runtime).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import click
from opentelemetry import trace

from stopline.caller import current_principal

FIELDS = "stopline_fields"
"""The LogRecord attribute holding a line's own fields (see `fields`)."""
TEXT = "text"
JSON = "json"

_operation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stopline_log_operation", default=None
)
_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stopline_log_principal", default=None
)


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: the event's facts (ids, counts, statuses; never secrets or
    inputs)."""
    return {FIELDS: values}


def bind(operation_id: str | None = None, principal: str | None = None) -> None:
    """For the rest of the current task (a run, a call): its lines carry these. Only values
    given are set."""
    if operation_id is not None:
        _operation.set(operation_id)
    if principal is not None:
        _principal.set(principal)


@contextlib.contextmanager
def bound(operation_id: str | None = None, principal: str | None = None) -> Iterator[None]:
    """`bind` for a block only."""
    tokens = []
    if operation_id is not None:
        tokens.append((_operation, _operation.set(operation_id)))
    if principal is not None:
        tokens.append((_principal, _principal.set(principal)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    """What a line carries besides its message: the context, then its own fields."""
    out: dict[str, Any] = {}
    own: dict[str, Any] = getattr(record, FIELDS, None) or {}
    operation = own.get("operation_id") or _operation.get()
    if operation:
        out["operation_id"] = operation
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        out["trace_id"] = format(span.trace_id, "032x")
        out["span_id"] = format(span.span_id, "016x")
    principal = own.get("principal") or _principal.get()
    if principal is None:
        try:
            principal = current_principal()
        except LookupError:
            principal = None
    if principal:
        out["principal"] = principal
    for key, value in own.items():
        if key not in ("operation_id", "principal"):
            out[key] = value
    return out


class ContextFilter(logging.Filter):
    """Reads the context when the line is logged (in the task that logs it), before any
    formatting that may happen elsewhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.stopline_context = _context(record)
        return True


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    context = getattr(record, "stopline_context", None)
    return context if context is not None else _context(record)


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n'):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-11-30 10:00:00,123 INFO runtime_service.runner: operation finished status=... `"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context_of(record)
        if not context:
            return line
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in context.items())
        head, newline, tail = line.partition("\n")  # a traceback stays below the line
        return f"{head} {pairs}{newline}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the
    context (operation_id, trace_id, span_id, principal) and the line's fields; `exception`
    holds a traceback where the code logged one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _context_of(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def handler(log_format: str = TEXT, stream: Any = None) -> logging.Handler:
    """A handler writing lines of `log_format` (with their context) to `stream` (stderr)."""
    out = _stream_handler(log_format, stream)
    out.addFilter(ContextFilter())
    return out


def _stream_handler(log_format: str, stream: Any) -> logging.Handler:
    out = logging.StreamHandler(sys.stderr if stream is None else stream)
    out.setFormatter(JsonFormatter() if log_format == JSON else TextFormatter())
    return out


# Lines queued and not yet written, at most: a stderr that stops taking lines (a log pipe that
# backs up) then costs lines, counted and reported once it takes them again, rather than memory
# without bound or a stalled event loop.
MAX_QUEUED_LINES = 10_000


class _Enqueue(logging.handlers.QueueHandler):
    """Hands a line to the writer thread with its context read (ContextFilter, on this
    handler) and its message made, and nothing else: the stdlib's prepare() formats the whole
    line here and copies the record, which is the cost this handler exists to move off the
    event loop."""

    def __init__(self, lines: queue.Queue[Any]) -> None:
        super().__init__(lines)
        self.lines = lines
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args:
            # The arguments may change once this returns; the line must say what they were.
            record.msg = record.getMessage()
            record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1


# How often the writer thread wakes to format and write the lines queued since it last did.
# It wakes on its own clock rather than when a line is queued: woken by the line, it would take
# the GIL from the event loop right when the loop is answering (a stop's answer and its terminal
# event take a few milliseconds, and their lines are logged on the way).
WRITE_INTERVAL_SECONDS = 0.05

_STOP = object()


class _Writer:
    """The thread that formats and writes the queued lines, every WRITE_INTERVAL_SECONDS."""

    def __init__(self, enqueue: _Enqueue, out: logging.Handler) -> None:
        self.enqueue = enqueue
        self.out = out
        self._reported = 0
        self._thread = threading.Thread(target=self._run, name="stopline log writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lines, out = self.enqueue.lines, self.out
        while True:
            time.sleep(WRITE_INTERVAL_SECONDS)
            with contextlib.suppress(queue.Empty):
                while True:
                    record = lines.get_nowait()
                    if record is _STOP:
                        self._report_dropped()
                        return
                    out.handle(record)
            self._report_dropped()

    def _report_dropped(self) -> None:
        dropped = self.enqueue.dropped
        if dropped > self._reported:
            line = logging.LogRecord(
                __name__,
                logging.WARNING,
                __file__,
                0,
                "%d log lines dropped: stderr did not take them as fast as they came",
                (dropped - self._reported,),
                None,
            )
            self._reported = dropped
            self.out.handle(line)

    def stop(self) -> None:
        """Write out what is queued, then end; within a few seconds, even when stderr takes
        nothing more (the exit of the process must not hang on its log pipe)."""
        with contextlib.suppress(queue.Full):
            self.enqueue.lines.put(_STOP, timeout=2)
        self._thread.join(timeout=2)


_writer_thread: _Writer | None = None


def configure(level: str = "INFO", log_format: str = TEXT) -> None:
    """The services' logging: one handler on the root logger (replacing any), at `level`.

    A line is formatted and written by a thread of its own, a moment after it is logged, not
    by the code that logs it: the services log on the event loop, also on the paths a client
    waits on (a stop's lines are logged before its answer goes out), and a write to a stderr
    that has stopped taking lines would stall the loop. A line keeps the time it was logged
    at. The queue is written out when the process exits normally (atexit), so only a process
    killed outright loses its last lines (those of its last WRITE_INTERVAL_SECONDS)."""
    global _writer_thread
    _stop_writer()
    # Neither format shows where a line was logged from, nor its thread or process: spare
    # every line the frame walk and lookups that fill those in (the logging HOWTO's
    # "Optimization"), a quarter of what logging a line costs the code that logs it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    enqueue = _Enqueue(queue.Queue(MAX_QUEUED_LINES))
    enqueue.addFilter(ContextFilter())
    _writer_thread = _Writer(enqueue, _stream_handler(log_format, None))
    root.addHandler(enqueue)
    root.setLevel(level.upper())


@atexit.register
def _stop_writer() -> None:
    """Write out what is queued, then log straight to the writer: a line logged after this
    (late in the interpreter's exit) is written, not queued for a thread that has gone."""
    global _writer_thread
    writer, _writer_thread = _writer_thread, None
    if writer is None:
        return
    writer.stop()
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _Enqueue):
            root.removeHandler(old)
            writer.out.addFilter(ContextFilter())
            root.addHandler(writer.out)


log_format_option = click.option(
    "--log-format",
    type=click.Choice([TEXT, JSON]),
    envvar="STOPLINE_LOG_FORMAT",
    default=TEXT,
    show_default=True,
    help="Log lines readable (text) or one JSON object per line (json).",
)
