"""Which span exporters the standard `OTEL_*` variables ask for, and making them: shared by the
services' tracing set-up (tracing.py) and the export process (span_export.py), which import it
from here rather than from each other."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def exporter_names(env: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the environment asks for; empty: tracing stays off."""
    env = os.environ if env is None else env
    if _flag(env, "OTEL_SDK_DISABLED"):
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [n.strip() for n in named.split(",") if n.strip() and n.strip() != "none"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def check_exporter(name: str, env: Mapping[str, str]) -> None:
    """ValueError naming the variable, as `new_exporter` would, without making the exporter."""
    if name == "console":
        return
    if name != "otlp":
        raise ValueError(
            f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (use otlp, console or none)"
        )
    protocol = otlp_protocol(env)
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r} "
            "(grpc or http/protobuf)"
        )


def otlp_protocol(env: Mapping[str, str]) -> str:
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()


def new_exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    """The exporter `name` of OTEL_TRACES_EXPORTER (the OTLP ones read the rest of OTEL_*)."""
    check_exporter(name, env)
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if otlp_protocol(env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()
