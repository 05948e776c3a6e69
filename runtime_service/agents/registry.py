"""Resolve agent names to agent objects.

Agents come from three places, later ones overriding earlier: the built-ins, the `stopline.agents`
entry-point group of installed packages, and explicit `name=package.module:attr` specs given to the
runtime by its operator. Clients only ever name an agent; they can never make the runtime import
arbitrary code.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from runtime_service.agents.base import Agent
from runtime_service.agents.builtin import EchoAgent, TickerAgent
from runtime_service.agents.llm import LLMAgent
from runtime_service.config import LLMSettings
from runtime_service.plugins import import_plugin, load_plugins

ENTRY_POINT_GROUP = "stopline.agents"


class AgentLoadError(Exception):
    """An operator-given agent spec cannot be loaded; raised at start-up, never per request."""


def _instantiate(obj: Any, origin: str) -> Agent:
    agent = obj() if isinstance(obj, type) else obj
    if not isinstance(agent, Agent):
        raise AgentLoadError(
            f"{origin} is not an agent: it needs validate_input() and async step()"
        )
    return agent


def import_agent(spec: str) -> Agent:
    """Load `package.module:attr` (a class, which is instantiated, or an agent object)."""
    return import_plugin(spec, "agent", _instantiate, AgentLoadError)


class AgentRegistry:
    def __init__(self, agents: Mapping[str, Agent]) -> None:
        self._agents = dict(agents)

    @classmethod
    def load(
        cls,
        specs: Iterable[str] = (),
        *,
        use_entry_points: bool = True,
        llm: LLMSettings | None = None,
        tool_names: Callable[[], Collection[str]] | None = None,
    ) -> AgentRegistry:
        """Built-ins, then entry points, then `name=module:attr` specs from configuration.
        `llm` configures the built-in `llm` agent's provider (constructing it is free: no
        network, and the SDK is imported on its first step); `tool_names` lists the registered
        tools, so that it refuses unknown ones in its input at start."""
        agents: dict[str, Agent] = {
            "echo": EchoAgent(),
            "ticker": TickerAgent(),
            "llm": LLMAgent(llm, tool_names),
        }
        return cls(
            load_plugins(
                agents,
                ENTRY_POINT_GROUP,
                specs,
                "agent",
                _instantiate,
                AgentLoadError,
                use_entry_points,
            )
        )

    def get(self, name: str) -> Agent | None:
        return self._agents.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._agents)

    async def aclose(self) -> None:
        """Let agents that hold connections (the `llm` agent's HTTP client) close them: on
        aiohttp an unclosed session is reported at exit."""
        for agent in self._agents.values():
            close = getattr(agent, "aclose", None)
            if close is not None:
                await close()
