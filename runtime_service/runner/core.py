"""The runner: what the rest of the runtime sees of it (submit, wake, deliver a stop or a pause,
shut down), and one operation's run from its claim to its last write. The jobs it hands out:
the step loop (steps.py), asking a person (asking.py), the limits (limits.py), the claim and
lease loops (leases.py), the sweep (sweep.py), and its writes and their events (writes.py).

Cancelling a run because of shutdown, a lost lease or a lost database is not a stop: nothing
terminal is written, the operation stays RUNNING, and whoever claims it next resumes it from its
last checkpoint.

A stop recorded by another replica arrives (on PostgreSQL) as a notification, and so does a
pause (the same channel, marked); the lease loop's periodic look at the stored intent is the
fallback.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from opentelemetry import trace

from runtime_service import metrics, run_telemetry
from runtime_service.agents.registry import AgentRegistry
from runtime_service.domain import Event, Operation
from runtime_service.hub import EventHub
from runtime_service.notifications import PAUSE_MARK
from runtime_service.runner import runs
from runtime_service.runner.asking import Asking
from runtime_service.runner.leases import Leases
from runtime_service.runner.limits import Limits
from runtime_service.runner.runs import Run, RunnerSettings
from runtime_service.runner.steps import Steps
from runtime_service.runner.sweep import Sweep
from runtime_service.runner.writes import Writes
from runtime_service.storage import STORAGE_FAILURES, Claimed, Storage
from runtime_service.tools import ToolRegistry
from runtime_service.tools.toolbox import ToolBox
from stopline import logs
from stopline.json_values import shown

log = logging.getLogger(__package__)


class Runner:
    def __init__(
        self,
        storage: Storage,
        agents: AgentRegistry,
        hub: EventHub,
        settings: RunnerSettings,
        tools: ToolBox | None = None,
        meters: metrics.RuntimeMetrics | None = None,
    ) -> None:
        self.metrics = meters or metrics.RuntimeMetrics()
        self._storage = storage
        self._agents = agents
        self._hub = hub
        self.settings = settings
        self.runner_id = settings.runner_id
        self._runs: dict[str, Run] = {}
        # Told when a run becomes this runner's (claimed) and when it ends (see tell_runs).
        self._on_owned: Callable[[str, bool], object] = _nothing
        self._writes = Writes(hub, self.metrics, self._runs)
        self._limits = Limits(storage, self._writes, settings.poll_seconds)
        asking = Asking(storage, self._writes, self.runner_id, settings.input_expiry_seconds)
        toolbox = tools or ToolBox(ToolRegistry.load(use_entry_points=False))
        self._steps = Steps(
            storage, settings, toolbox, self.metrics, self._writes, self._limits, asking
        )
        self._leases = Leases(
            storage,
            settings,
            self._runs,
            self._writes,
            self.metrics,
            self._launch,
            self.deliver_stop,
            self.deliver_pause,
        )
        self._sweep = Sweep(storage, self._writes, self._limits, self.wake, settings.poll_seconds)
        self._loops: list[asyncio.Task[None]] = []
        self._closed = False
        self.metrics.count_running(self._runs.__len__)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Begin claiming work and renewing leases."""
        self._loops = [
            asyncio.create_task(self._leases.claim_loop(), name="claim loop"),
            asyncio.create_task(self._leases.lease_loop(), name="lease loop"),
            asyncio.create_task(self._sweep.loop(), name="input expiry loop"),
        ]
        # Counted only when scraped, on this loop (see metrics.StoredOperations).
        self.metrics.stored.bind(asyncio.get_running_loop(), self._storage.count_unfinished)

    def submit(self, operation_id: str) -> None:
        """Fast path for an operation started here: run it now if there is room; otherwise
        it stays PENDING and the claim loop (here or on another replica) takes it later."""
        if operation_id in self._runs or self._closed:
            return  # shutting down: it stays PENDING for another replica or the next start
        if len(self._runs) >= self.settings.max_running:
            self.wake()
            return
        self._launch(operation_id, None)

    def reserve(self) -> str | None:
        """A slot here for a start that can run at once, and the id its operation is to be
        created with (None: no room). The run is registered under that id before the create's
        write, as a claim's is before the claim's, so that a stop landing meanwhile reaches it;
        `adopt` then runs it, or gives the slot back."""
        if not self.has_room:
            return None
        operation_id = str(uuid.uuid4())
        self._runs[operation_id] = self._new_run(operation_id)
        return operation_id

    def adopt(self, operation_id: str, began: tuple[Claimed, Event] | None) -> None:
        """Run a reserved operation that its create claimed for this runner (`began`: the claim
        and its first step_started, published here at once), or give the slot back (None)."""
        run = self._runs.get(operation_id)
        if run is None or run.task is not None:
            return
        if began is None or self._closed:
            del self._runs[operation_id]
            if began is None:
                self.wake()  # the slot is free again
            return  # closed: the lease, ours, lapses and whoever claims it next resumes it
        claimed, begun = began
        self._writes.publish([claimed.event, begun])
        self._start(run, claimed, begun)

    def release(self, operation_id: str) -> asyncio.Future[Operation | None] | None:
        """A held start's release, run here at once: the release and the claim, with the first
        step begun, in one write (the run's first), whose outcome the future holds: the claimed
        operation, or None when it was not held. None when it cannot run here now (no room,
        shutting down, or running already): the caller releases it in storage instead."""
        if (
            self._closed
            or operation_id in self._runs
            or len(self._runs) >= self.settings.max_running
        ):
            return None
        released: asyncio.Future[Operation | None] = asyncio.get_running_loop().create_future()
        # Nobody may wait any more (the call was cancelled): its outcome is not an error to log.
        released.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._launch(operation_id, None, released)
        return released

    def wake(self) -> None:
        """Look for claimable work now (a notification, a freed slot, a reconnect)."""
        self._leases.wake()

    def check_stops_now(self) -> None:
        """Re-read stored stop intents now (after notifications may have been missed)."""
        self._leases.check_stops_now()

    def deliver_stop(
        self, operation_id: str, seen_at: datetime | None = None, cause: str | None = None
    ) -> bool:
        """Wake the loop of an operation this runner runs; False if it runs nothing by that id
        (the stop is still recorded in storage, where the boundary check finds it).

        `seen_at`: a time just after the stop committed (the recording replica's own, taken
        right after its commit, or the arrival of the stop's notification), from which halt_ms
        is measured; None when the stop was found later (the periodic re-read): halt_ms then
        runs from the stored stop time."""
        run = self._runs.get(operation_id)
        if run is None:
            return False
        runs.stop(run, seen_at, cause)
        return True

    def tell_runs(self, owned: Callable[[str, bool], object]) -> None:
        """`owned(operation_id, True)` once a run here has claimed its operation, and
        `owned(operation_id, False)` when that run ends: meanwhile this runner writes and
        publishes the operation's events itself (a PostgreSQL replica need not hear them)."""
        self._on_owned = owned

    def runs(self, operation_id: str) -> bool:
        """Whether this runner runs the operation now (a stop recorded here reaches it at once)."""
        return operation_id in self._runs

    def stop_notified(self, operation_id: str) -> None:
        """A stop's (or a pause's, marked) notification arrived (sent on its commit)."""
        if operation_id.startswith(PAUSE_MARK):
            self.deliver_pause(operation_id[len(PAUSE_MARK) :])
            return
        self.deliver_stop(operation_id, datetime.now(UTC))

    def deliver_pause(self, operation_id: str) -> bool:
        """Cut the step of an operation this runner runs, for a recorded pause; False if it
        runs nothing by that id (the lease loop's look at the stored intent finds it)."""
        run = self._runs.get(operation_id)
        if run is None:
            return False
        runs.pause(run)
        return True

    @property
    def has_room(self) -> bool:
        """Whether an operation submitted now would run here at once."""
        return not self._closed and len(self._runs) < self.settings.max_running

    async def wait_finished(self, operation_id: str) -> None:
        """Until this runner no longer runs the operation (for tests and shutdown)."""
        run = self._runs.get(operation_id)
        if run is not None and run.task is not None:
            await asyncio.wait({run.task})

    async def shutdown(self) -> None:
        """Stop claiming, cancel every run without recording anything, and hand the leases
        back so another replica (or the next start) resumes the operations at once."""
        if self._closed:
            return
        self._closed = True
        self.metrics.stored.unbind()
        for loop in self._loops:
            loop.cancel()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for task in [*self._loops, *tasks]:
            task.cancel()
        if self._loops or tasks:
            await asyncio.wait([*self._loops, *tasks])
        try:
            await self._storage.drop_leases(self.runner_id)
        except STORAGE_FAILURES as exc:
            log.warning("could not hand back leases (%s); they will expire", exc)

    # ------------------------------------------------------------------ one run

    def _launch(
        self,
        operation_id: str,
        claimed: Claimed | None,
        released: asyncio.Future[Operation | None] | None = None,
    ) -> None:
        if self._closed:
            return
        run = self._new_run(operation_id, released)
        self._runs[operation_id] = run
        self._start(run, claimed)

    def _new_run(
        self, operation_id: str, released: asyncio.Future[Operation | None] | None = None
    ) -> Run:
        stop = asyncio.get_running_loop().create_future()
        return Run(operation_id, stop, released=released, cut_on_stop=self.settings.abort_mid_step)

    def _start(self, run: Run, claimed: Claimed | None, begun: Event | None = None) -> None:
        task = asyncio.create_task(
            self._run(run, claimed, begun), name=f"operation {run.operation_id}"
        )
        run.task = task
        task.add_done_callback(partial(self._forget, run))

    def _forget(self, run: Run, task: asyncio.Task[None]) -> None:
        runs.answer_release(run, asyncio.CancelledError())  # if it never made its first write
        was_full = len(self._runs) >= self.settings.max_running
        if self._runs.get(run.operation_id) is run:
            del self._runs[run.operation_id]
        if run.owned:
            self._on_owned(run.operation_id, False)
        if was_full:
            # A slot opened where the claim loop had none: look for work that waited for one.
            # (Below capacity the loop already claims whatever becomes claimable.)
            self.wake()
        if not task.cancelled() and task.exception() is not None:
            log.error("operation %s: runner crashed", run.operation_id, exc_info=task.exception())

    async def _run(self, run: Run, claimed: Claimed | None, begun: Event | None = None) -> None:
        """`begun`: the first step's step_started, when claimed with it (and published)."""
        op_id = run.operation_id
        logs.bind(operation_id=op_id)  # this task's lines are about this operation
        try:
            if claimed is None:
                # Started here: claimed with its first step begun, in one write.
                lease = self.settings.lease_seconds
                release = run.released is not None
                with self._hub.local_write(op_id):
                    try:
                        taken = await self._storage.claim_and_start(
                            op_id, self.runner_id, lease, release
                        )
                    except BaseException as exc:
                        runs.answer_release(run, exc)
                        raise
                    runs.answer_release(run, None if taken is None else taken[0].operation)
                    if taken is None:
                        return  # taken elsewhere, held, finished, or stopped before it started
                    claimed, begun = taken
                    self._writes.publish([claimed.event, begun])
            elif begun is None:
                self._writes.publish([claimed.event, *claimed.settled])
            run.owned = True
            self._on_owned(op_id, True)
            operation = claimed.operation
            agent = self._agents.get(operation.agent)
            # Only registered names label the metrics: the set stays closed.
            run.agent = operation.agent if agent is not None else metrics.AGENT_UNKNOWN
            run.span = run_telemetry.operation_span(operation, run.agent)
            logs.bind(principal=operation.owner or None)
            with trace.use_span(
                run.span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                # In the run's span: the claim loop's task, which may have launched it, has none.
                log.info(
                    "operation started",
                    extra=logs.fields(agent=run.agent, step=operation.steps_completed),
                )
                self._limits.arm_deadline(run, operation)
                self.metrics.started.labels(run.agent).inc()
                if agent is None:
                    message = f"agent {shown(operation.agent)} is not registered with this runtime"
                    step = operation.steps_completed
                    await self._writes.write(
                        op_id, self._storage.fail(op_id, step, message, self.runner_id)
                    )
                    return
                await self._steps.loop(run, agent, operation, begun)
        except STORAGE_FAILURES as exc:
            # Never guess an outcome without the database: leave the operation RUNNING; once
            # our lease lapses it is claimed again and resumed from its last checkpoint.
            log.warning(
                "operation %s: database unavailable (%s); leaving it for recovery", op_id, exc
            )
        finally:
            if run.deadline is not None:
                run.deadline.cancel()
            if run.step_task is not None and not run.step_task.done():
                run.step_task.cancel()  # shutdown or lost ownership: do not leave the agent running


def _nothing(operation_id: str, owned: bool) -> None:
    return None
