"""Blocking functions that tests/test_workers.py runs in worker processes (importable there)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime_service.workers import StopRequested

Emit = Callable[[str], None]


def echo(args: Any, emit: Emit) -> Any:
    return {"args": args, "pid": os.getpid()}


def chatty(args: Any, emit: Emit) -> str:
    """Emit, then block until the test opens the gate: the output must arrive meanwhile."""
    emit("first line")
    gate = Path(args["gate"])
    deadline = time.monotonic() + 30
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    emit("second line")
    return "returned"


def spin(args: Any, emit: Emit) -> None:
    """Pure CPU, never yields."""
    emit(str(os.getpid()))
    while True:
        pass


def stubborn(args: Any, emit: Emit) -> None:
    """Ignores the polite stop: only SIGKILL ends it. (The stop can arrive while `emit` is still
    returning, so the emit is inside the try too.)"""
    while True:
        try:
            emit(str(os.getpid()))
            while True:
                pass
        except StopRequested:
            continue


def polite(args: Any, emit: Emit) -> str:
    """Cleans up on the polite stop and returns within the grace."""
    try:
        emit(str(os.getpid()))
        while True:
            pass
    except StopRequested:
        Path(args["marker"]).write_text("cleaned up")
        return "cleaned"


def fail(args: Any, emit: Emit) -> None:
    raise ValueError(args["message"])


def not_json(args: Any, emit: Emit) -> Any:
    return {1, 2}


def crash(args: Any, emit: Emit) -> None:
    os._exit(3)
