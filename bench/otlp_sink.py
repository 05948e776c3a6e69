"""The observability benchmark's collector side, in a process of its own (as a collector and a
Prometheus are): an OTLP/gRPC trace sink that decodes every export and counts its spans by
`service.name`, and a scraper that GETs each metrics endpoint once a second, as Prometheus does.

Neither runs in the benchmark process, whose event loop and GIL are the client being timed.

    python -m bench.otlp_sink     # prints "ready PORT"; then reads commands on stdin:

    targets URL [URL...]   the metrics endpoints to scrape
    scrape on | scrape off scraping runs only during the "on" arm's rounds
    stats                  one JSON line: spans by service, exports, scrapes by target
    quit
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

SCRAPE_INTERVAL = 1.0


def service_of(resource_spans: Any) -> str:
    """The `service.name` of an export's ResourceSpans ("unknown" without one)."""
    return next(
        (
            a.value.string_value
            for a in resource_spans.resource.attributes
            if a.key == "service.name"
        ),
        "unknown",
    )


class Sink(ts_grpc.TraceServiceServicer):
    """Accepts every export (the exporter's whole cost is real: encoding, the call, the wire)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: Counter[str] = Counter()
        self.exports = 0

    def Export(
        self, request: ts.ExportTraceServiceRequest, context: Any
    ) -> ts.ExportTraceServiceResponse:
        counts: Counter[str] = Counter()
        for resource_spans in request.resource_spans:
            service = service_of(resource_spans)
            counts[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
        with self.lock:
            self.spans.update(counts)
            self.exports += 1
        return ts.ExportTraceServiceResponse()


class Scraper:
    """GET each target every second while switched on; a scrape is good when it answers 200 with
    Stopline's metrics in it."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.on = threading.Event()
        self.lock = threading.Lock()
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.on.wait()
            began = time.monotonic()
            for url in list(self.targets):
                self._scrape(url)
            time.sleep(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - began)))

    def _scrape(self, url: str) -> None:
        began = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                body = reply.read()
            good = reply.status == 200 and b"stopline_" in body
        except OSError:
            good, body = False, b""
        with self.lock:
            (self.ok if good else self.failed)[url] += 1
            self.bytes[url] += len(body)
            self.seconds[url] += time.perf_counter() - began


def main() -> None:
    sink = Sink()
    scraper = Scraper()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ts_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ready {port}", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "targets":
            scraper.targets = args
        elif command == "scrape":
            (scraper.on.set if args == ["on"] else scraper.on.clear)()
        elif command == "stats":
            with sink.lock, scraper.lock:
                stats = {
                    "spans_by_service": dict(sink.spans),
                    "exports": sink.exports,
                    "scrapes_ok": dict(scraper.ok),
                    "scrapes_failed": dict(scraper.failed),
                    "scraped_bytes": dict(scraper.bytes),
                    "scrape_seconds": dict(scraper.seconds),
                }
            print(json.dumps(stats), flush=True)
        elif command == "quit":
            break
    server.stop(grace=None)


if __name__ == "__main__":
    main()
