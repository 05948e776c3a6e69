"""Blocking code in worker processes that a stop can kill.

A thread cannot be stopped, and a coroutine that never awaits cannot be cancelled, so a tool or
agent declared blocking runs here: `await pool.call("package.module:function", args)` runs
`function(args, emit)` in a warm worker process and returns its result. Only JSON crosses the
boundary (arguments, the result, and each `emit(text)`, which reaches the caller's `on_output`
while the function runs), one JSON document per line over a socket pair.

Stopping: when the awaiting task is cancelled (a stop) or the call's time limit runs out, the
worker gets SIGTERM, which raises `StopRequested` inside the function (a BaseException, so an
`except Exception` in the function does not swallow it); the worker then exits. If it has not
exited after `grace` seconds it gets SIGKILL. `call` returns (raises) only once the process is
gone, so nothing the function does outlives the stop; what it emits after the stop is dropped
(a stopped operation has no output after its stop). A worker that was stopped, killed or died
is never reused; the pool starts a replacement in the background.

Workers are started with `forkserver` (or `spawn`), never `fork`: the runtime process runs gRPC
threads, and forking a process with threads copies locks held by threads that do not exist in
the child. The fork server preloads this module, so a new worker costs a fork of a small
process (a few ms, where spawn takes tens), and `size` workers are prestarted so a call does
not wait for one: a call on a warm worker costs a socket round trip.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import inspect
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from stopline.errors import StoplineError

log = logging.getLogger(__name__)

OnOutput = Callable[[str], Awaitable[None] | None]
_MAX_LINE = 64 * 1024 * 1024  # one message (a result or an output chunk) at most


class WorkerError(StoplineError):
    """A call in a worker process did not produce a result; the message says why."""


class CallFailed(WorkerError):
    """The function raised. `error_type` is the exception's class name; the message is its
    text (the traceback goes to this module's log, never to callers)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.error_type = error_type


class CallTimedOut(WorkerError):
    """The call ran past its time limit and was stopped like a cancelled one."""


class NotJSON(WorkerError):
    """Arguments or a result that JSON cannot carry."""


class WorkerLost(WorkerError):
    """The worker process ended during the call without answering (crashed, killed from
    outside, or exited on its own)."""


class StopRequested(BaseException):
    """Raised inside the function when the call is stopped; catch it to clean up, then return
    or re-raise quickly: the process is killed when the grace runs out."""


def _dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode() + b"\n"


# --- the worker process -------------------------------------------------------------------

_stopping = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _stopping
    if not _stopping:  # raise once: a second SIGTERM must not interrupt the clean-up
        _stopping = True
        raise StopRequested


def _resolve(target: str) -> Callable[..., Any]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r} is not 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def _watch_the_runtime(sock: socket.socket, busy: threading.Event) -> None:
    """A daemon thread: if the runtime's end of the socket closes while a call runs (the runtime
    died, say of kill -9), stop the call as a stop would (SIGTERM, then SIGKILL after the grace),
    so a blocking call never runs on unseen after its runtime; whoever resumes the operation
    settles the call's outcome as unknown. (The fork server cannot do this: every worker holds
    the fd it watches, so it outlives the runtime as long as a worker does.) Between calls the
    main loop reads the socket itself and exits at its end."""
    while True:
        select.select([sock], [], [])
        try:
            peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            peeked = b""
        if not peeked and busy.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(_ORPHAN_GRACE)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)  # data (or the end) the main loop has yet to read: look again soon


_ORPHAN_GRACE = 2.0


def _worker_main(sock: socket.socket) -> None:
    """The worker's loop: read a call, run it, answer; exit when stopped or the pipe closes."""
    busy = threading.Event()
    threading.Thread(target=_watch_the_runtime, args=(sock, busy), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the pool decides
    signal.signal(signal.SIGTERM, _on_sigterm)
    lock = threading.Lock()  # emit may be called from the function's own threads
    reader, writer = sock.makefile("rb"), sock.makefile("wb")

    def send(message: dict[str, Any]) -> None:
        data = _dumps(message)
        with lock:
            writer.write(data)
            writer.flush()

    def emit(text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"emit takes a str, not {type(text).__name__}")
        send({"op": "output", "text": text})

    try:
        send({"op": "ready", "pid": os.getpid()})
        for line in reader:
            request = json.loads(line)
            busy.set()
            try:
                value = _resolve(request["target"])(request["args"], emit)
            except StopRequested:
                raise
            except BaseException as exc:  # SystemExit too: the function's failure, not ours
                message = {"op": "error", "type": type(exc).__name__, "message": str(exc)}
                send({**message, "traceback": traceback.format_exc()})
            else:
                try:
                    send({"op": "result", "value": value})  # encodes before it writes
                except (TypeError, ValueError) as exc:
                    send({"op": "not_json", "message": f"the result is not JSON: {exc}"})
            busy.clear()
            if _stopping:  # the function caught StopRequested and returned: still stop
                return
    except (StopRequested, BrokenPipeError, ConnectionResetError):
        return


# --- the pool -----------------------------------------------------------------------------


class _Worker:
    def __init__(
        self, process: BaseProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.process, self.reader, self.writer = process, reader, writer
        self.pid: int = process.pid or 0
        self.stopping: asyncio.Task[None] | None = None  # one stop per worker, however asked
        self.exitcode: int | None = None
        # One watcher of the process's sentinel (readable once it has ended) for every waiter:
        # the loop keeps one reader per fd, so two add_reader calls would starve one of them.
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reaper: asyncio.Task[None] | None = None
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_sentinel)

    def _on_sentinel(self) -> None:
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        self.process.join(0)  # the sentinel is readable, so this does not block...
        if self.process.exitcode is None:  # ...unless the exit is not waitable yet (spawn)
            await asyncio.to_thread(self.process.join)
        self.exitcode = self.process.exitcode
        self.ended.set_result(None)

    async def exited(self, within: float | None) -> bool:
        """Wait (without blocking the loop) until the process has ended and been reaped."""
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), within)
        except TimeoutError:
            return False
        return True

    def forget(self) -> None:
        """Release the socket and the process object (the process has ended)."""
        self.writer.close()
        self.process.close()


class WorkerPool:
    """Warm worker processes for blocking calls; see the module docstring.

    `size` workers are started by `start()` and kept idle; up to `max_workers` calls run at once
    (more wait), the extra workers exiting after their call. `grace` is how long a stopped call's
    process may take to exit before SIGKILL; `time_limit` (None: none) bounds a call unless the
    call gives its own. `exits` keeps the (pid, exit code) of the last stopped workers: 0 is a
    clean exit, -9 a kill."""

    def __init__(
        self,
        *,
        size: int = 2,
        max_workers: int = 8,
        grace: float = 2.0,
        time_limit: float | None = None,
        start_method: str = "forkserver",
        start_timeout: float = 30.0,
    ) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn' (fork is unsafe here)")
        if not 0 <= size <= max_workers or max_workers < 1:
            raise ValueError("need 0 <= size <= max_workers and max_workers >= 1")
        self.size, self.grace, self.time_limit = size, grace, time_limit
        self.start_timeout = start_timeout
        self.exits: collections.deque[tuple[int, int | None]] = collections.deque(maxlen=64)
        if start_method == "forkserver":
            self._ctx: ForkServerContext | SpawnContext = multiprocessing.get_context("forkserver")
            # "__main__" as multiprocessing does by default: a child imports the parent's main
            # module (as __mp_main__; scripts need the `if __name__ == "__main__"` guard), and
            # the fork server doing it once spares every worker the import.
            self._ctx.set_forkserver_preload(["__main__", __name__])
        else:
            self._ctx = multiprocessing.get_context("spawn")
        self._slots = asyncio.Semaphore(max_workers)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = 0
        self._closed = False

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Prestart the warm workers (and the fork server)."""
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.size - len(self._idle))))
        self._idle.extend(workers)

    async def close(self) -> None:
        """Stop every worker (idle or busy) and wait until they are gone."""
        self._closed = True
        workers, self._idle = [*self._idle, *self._busy], []
        stops = [self._stop(w) for w in workers]
        await asyncio.gather(*stops, *self._tasks, return_exceptions=True)

    def pids(self) -> list[int]:
        return [w.pid for w in [*self._idle, *self._busy]]

    async def call(
        self,
        target: str,
        args: Any,
        *,
        on_output: OnOutput | None = None,
        time_limit: float | None = None,
    ) -> Any:
        """Run `target(args, emit)` in a worker and return its JSON result.

        Raises CallFailed (the function raised), CallTimedOut, NotJSON, WorkerLost; a
        cancellation stops the worker (SIGTERM, grace, SIGKILL) before it propagates."""
        try:
            payload = _dumps({"op": "call", "target": target, "args": args})
        except (TypeError, ValueError) as exc:
            raise NotJSON(f"the arguments are not JSON: {exc}") from None
        limit = self.time_limit if time_limit is None else time_limit
        async with self._slots:
            worker = await self._acquire()
            try:
                async with asyncio.timeout(limit):
                    value = await self._converse(worker, payload, on_output)
            except (CallFailed, NotJSON):
                self._release(worker)  # the worker is fine: only the function failed
                raise
            except TimeoutError:
                await self._stop_shielded(worker)
                raise CallTimedOut(
                    f"{target} ran longer than its time limit of {limit} s"
                ) from None
            except BaseException:  # cancelled (a stop), the worker lost, or on_output raised
                await self._stop_shielded(worker)
                raise
            self._release(worker)
            return value

    async def _converse(self, worker: _Worker, payload: bytes, on_output: OnOutput | None) -> Any:
        try:
            worker.writer.write(payload)
            await worker.writer.drain()
        except ConnectionError:
            raise _lost(worker) from None
        while True:
            message = await _receive(worker)
            op = message["op"]
            if op == "output":
                if on_output is not None:
                    emitted = on_output(message["text"])
                    if inspect.isawaitable(emitted):
                        await emitted
            elif op == "result":
                return message["value"]
            elif op == "not_json":
                raise NotJSON(message["message"])
            elif op == "error":
                log.warning("worker call failed: %s", message["traceback"].rstrip())
                raise CallFailed(message["type"], message["message"])

    async def _acquire(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if not worker.ended.done():
                self._busy.add(worker)
                self._replenish()
                return worker
            self._stop(worker)  # died while idle: record it and clean up
        worker = await self._spawn()
        self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if self._closed or len(self._idle) >= self.size:
            self._stop(worker)
        else:
            self._idle.append(worker)

    async def _spawn(self) -> _Worker:
        parent_end, child_end = socket.socketpair()
        process = self._ctx.Process(
            target=_worker_main, args=(child_end,), daemon=True, name="stopline-worker"
        )
        try:
            await asyncio.to_thread(process.start)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end, limit=_MAX_LINE)
        worker = _Worker(process, reader, writer)
        try:
            async with asyncio.timeout(self.start_timeout):
                ready = json.loads(await reader.readline() or b"null")
        except BaseException:
            await asyncio.shield(self._stop(worker))
            raise
        if not isinstance(ready, dict) or ready.get("op") != "ready":
            await asyncio.shield(self._stop(worker))
            raise WorkerLost(f"a worker process failed to start (exit code {worker.exitcode})")
        return worker

    def _replenish(self) -> None:
        """Keep `size` workers idle or starting, in the background."""
        if self._closed or len(self._idle) + self._starting >= self.size:
            return
        self._starting += 1

        async def refill() -> None:
            try:
                worker = await self._spawn()
            finally:
                self._starting -= 1
            if self._closed:
                await self._stop(worker)
            else:
                self._idle.append(worker)

        self._background(refill())

    def _background(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def _stop_shielded(self, worker: _Worker) -> None:
        """Stop a worker; a second cancellation does not abandon the kill (it goes on in the
        background) but is passed on."""
        self._busy.discard(worker)
        self._replenish()
        await asyncio.shield(self._stop(worker))

    def _stop(self, worker: _Worker) -> asyncio.Task[None]:
        """SIGTERM, wait `grace`, SIGKILL; done once the process is gone (and reaped)."""
        if worker.stopping is None:
            worker.stopping = self._background(self._terminate(worker))
        return worker.stopping

    async def _terminate(self, worker: _Worker) -> None:
        if not worker.ended.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
            if not await worker.exited(self.grace):
                log.warning(
                    "worker %d did not exit within %.1f s of SIGTERM; killing it",
                    worker.pid,
                    self.grace,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                await worker.exited(None)
        self.exits.append((worker.pid, worker.exitcode))
        worker.forget()


def _lost(worker: _Worker) -> WorkerLost:
    code = worker.exitcode
    said = f" (exit code {code})" if code is not None else ""
    return WorkerLost(f"the worker process ended during the call{said}")


async def _receive(worker: _Worker) -> dict[str, Any]:
    try:
        line = await worker.reader.readline()
        if line:
            message: dict[str, Any] = json.loads(line)
            return message
    except (ConnectionError, ValueError):  # ValueError: a torn or oversized line
        pass
    await worker.exited(1.0)  # the EOF comes first: give the exit code a moment to arrive
    raise _lost(worker)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("worker pool background task failed: %r", task.exception())
