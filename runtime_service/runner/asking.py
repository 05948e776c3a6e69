"""Waiting for a person (storage/waiting.py), the runner's side: a step that returns `ask` ends
the run: the boundary write checkpoints it, stores the request and leaves the operation WAITING
with no runner, so the slot and the coroutine are freed at once. An answer (or an expiry, swept
by every replica's sweep loop) makes it PENDING, and whichever runner claims it gives the answer
to the next step (StepContext.answer)."""

from __future__ import annotations

from runtime_service import waiting
from runtime_service.agents.base import Answered, InputRequest, StepResult
from runtime_service.domain import Operation
from runtime_service.runner.writes import Writes
from runtime_service.storage import Storage


class Asking:
    def __init__(
        self, storage: Storage, writes: Writes, runner_id: str, expiry_seconds: float
    ) -> None:
        self._storage = storage
        self._writes = writes
        self._runner_id = runner_id
        self._expiry_seconds = expiry_seconds

    async def ask(self, op_id: str, step: int, result: StepResult, request: InputRequest) -> bool:
        """End the run with the step's question: the operation WAITS, holding nothing here.
        False when a stop was recorded first: the step is checkpointed and the stop wins (the
        caller halts)."""
        stored = waiting.new_request(step, request, self._expiry_seconds)
        written = await self._writes.write(
            op_id,
            self._storage.ask(op_id, step, result.output, result.state, stored, self._runner_id),
        )
        return len(written) != 1

    async def answer(self, operation: Operation, step: int) -> Answered | None:
        """The resolution of the request the step before `step` ended with, if it asked (only
        the first step of a run can follow a question: asking ends the run)."""
        request_id = operation.input_request_id
        if request_id is None or step != operation.steps_completed:
            return None
        stored = await self._storage.input_request(operation.id, request_id)
        if stored is None or stored.step != step - 1:
            return None
        return waiting.answered(stored)
