"""The runner: runs each operation's steps, checkpoints them, and halts on a stop (core.py has
the overview, and names the module of each of its jobs)."""

from runtime_service.runner.core import Runner
from runtime_service.runner.runs import RunnerSettings
from runtime_service.step_events import OperationHalted

__all__ = ["OperationHalted", "Runner", "RunnerSettings"]
