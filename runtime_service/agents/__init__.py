"""Agent plugins: the interface (base), the built-in agents and the name -> agent registry."""

from runtime_service.agents.base import Agent, InvalidInput, StepContext, StepResult

__all__ = ["Agent", "InvalidInput", "StepContext", "StepResult"]
