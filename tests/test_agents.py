"""Agent plugins: loading by entry point and by import path, and the built-ins' input checks."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_service.agents.base import InvalidInput, StepContext, StepResult
from runtime_service.agents.builtin import TickerAgent
from runtime_service.agents.registry import AgentLoadError, AgentRegistry, import_agent


class ShoutAgent:
    def validate_input(self, input: dict[str, Any]) -> None:
        return None

    async def step(self, ctx: StepContext) -> StepResult:
        return StepResult(output=str(ctx.input.get("text", "")).upper(), done=True)


NOT_AN_AGENT = object()


def test_builtins_and_entry_points_are_registered() -> None:
    registry = AgentRegistry.load()
    assert {"echo", "ticker"} <= set(registry.names)


def test_import_path_spec_loads_a_class_and_overrides_by_name() -> None:
    registry = AgentRegistry.load(
        ["shout=tests.test_agents:ShoutAgent", "echo=tests.test_agents:ShoutAgent"]
    )
    assert isinstance(registry.get("shout"), ShoutAgent)
    assert isinstance(registry.get("echo"), ShoutAgent)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("noequals", "name=package.module:attr"),
        ("x=tests.test_agents", "package.module:attr"),
        ("x=tests.no_such_module:Thing", "cannot load"),
        ("x=tests.test_agents:Missing", "cannot load"),
        ("x=tests.test_agents:NOT_AN_AGENT", "not an agent"),
    ],
)
def test_bad_specs_fail_at_start_up_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(AgentLoadError, match=message):
        AgentRegistry.load([spec])


def test_import_agent_accepts_instances() -> None:
    assert isinstance(import_agent("tests.test_agents:ShoutAgent"), ShoutAgent)


@pytest.mark.parametrize(
    ("input_value", "field"),
    [
        ({"steps": 0}, "input.steps"),
        ({"steps": 2.5}, "input.steps"),
        ({"steps": "three"}, "input.steps"),
        ({"steps": True}, "input.steps"),
        ({"step_seconds": -1}, "input.step_seconds"),
        ({"step_seconds": 1e308}, "input.step_seconds"),
        ({"chunk_interval_seconds": -0.5}, "input.chunk_interval_seconds"),
        # Values that pass a plain range test but are not a plain finite number.
        ({"step_seconds": False}, "input.step_seconds"),
        ({"steps": float("nan")}, "input.steps"),
        ({"step_seconds": float("inf")}, "input.step_seconds"),
        ({"step_seconds": float("-inf")}, "input.step_seconds"),
    ],
)
def test_ticker_rejects_bad_input_naming_the_field(input_value: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        TickerAgent().validate_input(input_value)
    assert err.value.field == field


def test_ticker_defaults_are_valid() -> None:
    TickerAgent().validate_input({})
    TickerAgent().validate_input({"steps": 3.0, "step_seconds": 0})
