"""Summaries of `py-spy record --format raw` profiles: where a process's samples go."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def top_frames(path: Path, count: int = 15) -> dict[str, Any]:
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        weight = int(n)
        samples += weight
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1] for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + weight
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + weight

    areas: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            area = _area(stack.split(";"))
            areas[area] = areas.get(area, 0) + int(n)

    def share(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:count]
        return [(frame, round(100 * hits / samples, 1)) for frame, hits in ranked]

    return {
        "samples": samples,
        "areas_percent": share(areas),
        "own_percent": share(own),
        "total_percent": share(total),
    }


# Where a sample's own time goes: the area of the frame nearest its leaf that has one (the
# asyncio loop only when no other frame does: a socket read under httpx is httpx's).
AREAS = (
    ("openai SDK: chunk models (construct_type)", ("openai/_models", "openai/_utils",
                                                    "openai/_compat", "pydantic", "typing",
                                                    "inspect.py")),
    ("openai SDK: SSE decoding", ("openai/_streaming",)),
    ("HTTP client I/O (httpx, httpcore, h11, anyio; aiohttp)", ("httpx", "httpcore", "h11/",
                                                               "anyio/", "aiohttp/")),
    ("storage (SQLAlchemy, SQLite, psycopg)", ("sqlalchemy/", "sqlite", "psycopg")),
    ("gRPC (grpc.aio, servicers)", ("grpc/", "grpc_status", "authn.py", "protobuf")),
    ("runtime/gateway logic", ("runtime_service/", "gateway_service/", "stopline/")),
)  # fmt: skip


# The event loop's dispatch: frames above it are the program's entry (its `main`), not the work,
# so a sample whose leaf-most marked frame is there is the loop's own (a task's wake-up, a
# callback, the selector), not the entry module's.
LOOP = ("Handle._run (asyncio/", "_run_once (asyncio/")


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        if frame.startswith(LOOP):
            return "asyncio loop (task wake-ups, callbacks, selector)"
        for name, marks in AREAS:
            if any(mark in frame for mark in marks):
                return name
    return "asyncio loop / other" if any("asyncio/" in f for f in frames) else "other"
