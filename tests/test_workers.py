"""Blocking code in killable worker processes (runtime_service/workers.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime_service.workers import (
    CallFailed,
    CallTimedOut,
    NotJSON,
    WorkerLost,
    WorkerPool,
)
from tests.conftest import eventually

F = "tests.worker_functions"


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    async with WorkerPool(size=1, grace=5.0) as p:
        yield p


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _pid_gone(pid: int) -> bool:
    return _gone(pid)


async def _pool_full(pool: WorkerPool, size: int) -> bool:
    return len(pool.pids()) >= size


class _Output:
    """Collects emitted lines; lets a test wait for the first one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.arrived = asyncio.Event()

    def __call__(self, text: str) -> None:
        self.lines.append(text)
        self.arrived.set()

    async def first(self) -> str:
        await asyncio.wait_for(self.arrived.wait(), 30)
        return self.lines[0]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
async def test_round_trip_on_a_warm_worker(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with WorkerPool(size=1, start_method=method) as pool:
        # No background refill: a worker started while the first call holds the warm one could
        # be idle first and take the second call (seen under load in CI), as in the typed-error
        # test below.
        monkeypatch.setattr(pool, "_replenish", lambda: None)
        (warm,) = pool.pids()
        args = {"a": [1, 2.5, "x", None, True], "b": {"nested": "ü"}}
        first = await pool.call(f"{F}:echo", args)
        second = await pool.call(f"{F}:echo", [])
    assert first == {"args": args, "pid": warm}
    assert second["pid"] == warm  # the warm worker is reused


async def test_output_arrives_while_the_call_runs(pool: WorkerPool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    output = _Output()
    call = asyncio.create_task(pool.call(f"{F}:chatty", {"gate": str(gate)}, on_output=output))
    assert await output.first() == "first line"
    assert not call.done()  # the function is still blocked: the line came while it ran
    gate.touch()
    assert await call == "returned"
    assert output.lines == ["first line", "second line"]


async def test_async_output_callback(pool: WorkerPool, tmp_path: Path) -> None:
    (tmp_path / "gate").touch()
    seen: list[str] = []

    async def on_output(text: str) -> None:
        await asyncio.sleep(0)
        seen.append(text)

    await pool.call(f"{F}:chatty", {"gate": str(tmp_path / "gate")}, on_output=on_output)
    assert seen == ["first line", "second line"]


@pytest.mark.parametrize(
    ("function", "grace", "exit_code"), [("spin", 5.0, 0), ("stubborn", 0.2, -9)]
)
async def test_cancel_kills_a_spinning_worker(function: str, grace: float, exit_code: int) -> None:
    """`while True` in pure Python: the polite SIGTERM ends it (exit 0); one that ignores it is
    SIGKILLed after the grace (-9). Either way the process is gone and the pool carries on."""
    async with WorkerPool(size=1, grace=grace) as pool:
        output = _Output()
        call = asyncio.create_task(pool.call(f"{F}:{function}", None, on_output=output))
        pid = int(await output.first())
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: _pid_gone(pid), timeout=10)
        assert (pid, exit_code) in pool.exits
        await eventually(lambda: _pool_full(pool, 1), timeout=30)  # replaced
        assert pid not in pool.pids()
        result = await pool.call(f"{F}:echo", "again")
        assert result["args"] == "again" and result["pid"] != pid


async def test_a_polite_function_cleans_up_and_exits_cleanly(
    pool: WorkerPool, tmp_path: Path
) -> None:
    output = _Output()
    marker = tmp_path / "marker"
    call = asyncio.create_task(pool.call(f"{F}:polite", {"marker": str(marker)}, on_output=output))
    pid = int(await output.first())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: _pid_gone(pid), timeout=10)
    assert (pid, 0) in pool.exits  # exited by itself, within the 5 s grace: not killed
    assert marker.read_text() == "cleaned up"


async def test_time_limit_stops_the_call(pool: WorkerPool) -> None:
    output = _Output()
    with pytest.raises(CallTimedOut, match=r"time limit of 0\.5 s"):
        await pool.call(f"{F}:spin", None, on_output=output, time_limit=0.5)
    pid = int(output.lines[0])
    await eventually(lambda: _pid_gone(pid), timeout=10)
    assert (await pool.call(f"{F}:echo", 1))["args"] == 1


async def test_pool_wide_time_limit() -> None:
    async with WorkerPool(size=0, time_limit=0.3) as pool:
        with pytest.raises(CallTimedOut):
            await pool.call(f"{F}:spin", None)


async def test_an_exception_becomes_a_typed_error(
    pool: WorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No background refill: a worker started beside the busy one could take the idle place,
    # and the pid below would change for that reason instead (seen under load).
    monkeypatch.setattr(pool, "_replenish", lambda: None)
    (pid,) = pool.pids()
    with pytest.raises(CallFailed) as caught:
        await pool.call(f"{F}:fail", {"message": "the disk is full"})
    assert caught.value.error_type == "ValueError"
    assert str(caught.value) == "ValueError: the disk is full"  # no traceback for callers
    assert (await pool.call(f"{F}:echo", None))["pid"] == pid  # the worker is still fine


async def test_unknown_target_is_a_failed_call(pool: WorkerPool) -> None:
    with pytest.raises(CallFailed, match="ModuleNotFoundError"):
        await pool.call("tests.no_such_module:f", None)
    with pytest.raises(CallFailed, match=r"not 'package\.module:function'"):
        await pool.call("no_colon", None)


async def test_json_only_crosses_the_boundary(pool: WorkerPool) -> None:
    with pytest.raises(NotJSON, match="result is not JSON"):
        await pool.call(f"{F}:not_json", None)
    with pytest.raises(NotJSON, match="arguments are not JSON"):
        await pool.call(f"{F}:echo", {"x": object()})
    with pytest.raises(NotJSON):
        await pool.call(f"{F}:echo", float("nan"))
    assert (await pool.call(f"{F}:echo", "ok"))["args"] == "ok"


async def test_a_worker_that_dies_is_reported_and_replaced(pool: WorkerPool) -> None:
    with pytest.raises(WorkerLost, match="exit code 3"):
        await pool.call(f"{F}:crash", None)
    assert (await pool.call(f"{F}:echo", "after"))["args"] == "after"


async def test_close_stops_busy_workers() -> None:
    pool = WorkerPool(size=1, grace=0.2)
    await pool.start()
    output = _Output()
    call = asyncio.create_task(pool.call(f"{F}:stubborn", None, on_output=output))
    pid = int(await output.first())
    await pool.close()
    assert _gone(pid)
    with pytest.raises(WorkerLost):
        await call
