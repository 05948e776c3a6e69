"""The checks of what a caller sends the runtime's use cases (operations.py): an agent and its
input, keys, labels and the other text fields, the hold, and the limits a start asks for against
the runtime's caps. Each raises the domain error naming the field, so every entry point (gRPC,
the gateway through it, tests) refuses the same input with the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime_service.agents.base import InvalidInput
from runtime_service.agents.registry import AgentRegistry
from runtime_service.config import RuntimeConfig
from stopline.errors import InvalidArgument
from stopline.json_values import shown
from stopline.limits import (
    MAX_ANSWER_ID,
    MAX_HOLD_SECONDS,
    MAX_REASON,
    MAX_REQUEST_ID,
    MAX_REQUESTED_BY,
    check_input_size,
)

MAX_IDEMPOTENCY_KEY = 200
MAX_LABELS = 32
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_AGENT_NAME = 200


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"has {len(labels)} entries; the limit is {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY:
            raise InvalidArgument("labels", f"keys must be 1 to {MAX_LABEL_KEY} characters")
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidArgument(f"labels[{key}]", f"is longer than {MAX_LABEL_VALUE} characters")
    return dict(labels)


def bounded_text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {limit}")
    return value


def check_agent_input(
    agents: AgentRegistry, agent_name: str, input_value: dict[str, Any], max_input_bytes: int
) -> None:
    """A registered agent, and an input of the allowed size that the agent accepts."""
    if not agent_name:
        raise InvalidArgument("agent", f"is required; registered agents: {', '.join(agents.names)}")
    agent = agents.get(agent_name)
    if agent is None:
        raise InvalidArgument(
            "agent",
            f"unknown agent {shown(agent_name)}; registered agents: {', '.join(agents.names)}",
        )
    check_input_size(input_value, max_input_bytes)
    try:
        agent.validate_input(input_value)
    except InvalidInput as exc:
        raise InvalidArgument(exc.field, exc.problem) from exc


def check_hold(hold_seconds: float) -> None:
    if not 0 <= hold_seconds <= MAX_HOLD_SECONDS:
        raise InvalidArgument(
            "hold",
            f"must be between 0 and {shown(MAX_HOLD_SECONDS)} seconds, got {shown(hold_seconds)}",
        )


def checked_deadline(config: RuntimeConfig, seconds: float | None) -> float | None:
    """A start's deadline: the configured default when unset, else at most the runtime's cap."""
    if seconds is None:
        return config.default_deadline_seconds
    cap = config.max_deadline_seconds
    if not 0 < seconds <= cap:
        raise InvalidArgument(
            "deadline",
            f"must be more than 0 and at most {shown(cap)} seconds (the runtime's cap), "
            f"got {shown(seconds)}",
        )
    return seconds


def checked_max_steps(config: RuntimeConfig, steps: int) -> int | None:
    """A start's step budget: the configured default for 0, else at most the runtime's cap."""
    if steps == 0:
        return config.default_max_steps
    cap = config.max_steps_cap
    if not 0 < steps <= cap:
        raise InvalidArgument(
            "max_steps",
            f"must be between 1 and {cap} (the runtime's cap), or 0 for the default; got {steps}",
        )
    return steps


def check_answer_fields(
    request_id: str,
    answer_id: str,
    answered_by: str,
    answer: dict[str, Any],
    max_input_bytes: int,
) -> str:
    """The fields of an answer, before its request is looked up; `answered_by` as checked."""
    if not request_id:
        raise InvalidArgument("request_id", "is required (InputRequested.request_id)")
    bounded_text(request_id, "request_id", MAX_REQUEST_ID)
    if not answer_id:
        raise InvalidArgument("answer_id", "is required: choose one, and reuse it on retries")
    bounded_text(answer_id, "answer_id", MAX_ANSWER_ID)
    by = bounded_text(answered_by, "answered_by", MAX_REQUESTED_BY)
    check_input_size(answer, max_input_bytes, "answer")
    if "reason" in answer:
        bounded_text(str(answer["reason"]), "answer.approval.reason", MAX_REASON)
    return by
