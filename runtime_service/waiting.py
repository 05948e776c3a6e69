"""Waiting for a person, in plain Python: what a step's question becomes in storage, what the next
step sees of its resolution, the checks an answer passes before it is stored, and what its caller
is told after.

Answers are stored as JSON objects: {"approved": bool, "reason": str, "arguments"?: object} for
an approval (no "arguments": as asked), {"value": any} for a question. The same shape is a
request's default (what an expiry gives) and the input_answered event's `answer`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema

from runtime_service.agents.base import APPROVAL, Answered, InputRequest
from runtime_service.domain import AnswerOutcome, AnswerResult, JSONValue, StoredRequest
from runtime_service.storage.interface import NewRequest
from stopline.errors import FailedPrecondition, InvalidArgument
from stopline.json_values import shown

EXPIRED = "expired"


def new_request(step: int, request: InputRequest, default_expiry: float) -> NewRequest:
    """The stored form of a step's question, with its id (made here: unguessable, unique) and
    its input_requested event's data."""
    expires_in = request.expires_in
    if expires_in is None or expires_in < 0:
        expires_in = default_expiry
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
    request_id = uuid.uuid4().hex[:16]
    default = request.default
    if default is None:
        default = (
            {"approved": False, "reason": "rejected by default: nobody answered in time"}
            if request.kind == APPROVAL
            else {"value": None}
        )
    data: dict[str, JSONValue] = {
        "step": step,
        "request_id": request_id,
        "kind": request.kind,
        "prompt": request.prompt,
        "expire_time": expires_at.isoformat(),
        "default_answer": default,
    }
    if request.kind == APPROVAL:
        data.update(
            call_id=request.call_id, tool_name=request.tool_name, arguments=request.arguments
        )
    if request.schema is not None:
        data["schema"] = request.schema
    return NewRequest(
        request_id, request.kind, request.prompt, data, request.schema, default, expires_at
    )


def answered(stored: StoredRequest) -> Answered | None:
    """What the next step sees of a resolved request (None while it is open)."""
    answer = stored.answer
    if answer is None:
        return None
    return Answered(
        request_id=stored.request_id,
        kind=stored.kind,
        step=stored.step,
        call_id=str(stored.data.get("call_id", "")),
        approved=bool(answer.get("approved", False)),
        reason=str(answer.get("reason", "")),
        arguments=answer.get("arguments", stored.data.get("arguments")),
        value=answer.get("value"),
        expired=stored.outcome == EXPIRED,
        answered_by=stored.answered_by or "",
        edited="arguments" in answer,
    )


def check_answer(stored: StoredRequest, answer: dict[str, Any]) -> None:
    """INVALID_ARGUMENT, naming the field, for an answer that does not fit the request: the
    wrong kind, or a value (edited arguments) that does not match the request's schema."""
    if stored.kind == APPROVAL:
        if "approved" not in answer:
            raise InvalidArgument(
                "answer.approval", "this request asks for an approval (approve or reject)"
            )
        if "arguments" in answer:
            if not answer.get("approved"):
                raise InvalidArgument(
                    "answer.approval.arguments", "edited arguments come with an approval only"
                )
            _match(answer["arguments"], stored.schema, "answer.approval.arguments")
        return
    if "value" not in answer:
        raise InvalidArgument("answer.value", "this request asks for a value, not an approval")
    _match(answer["value"], stored.schema, "answer.value")


def answer_outcome(
    result: AnswerResult, operation_id: str, request_id: str, answer_id: str
) -> AnswerOutcome:
    """A stored answer's outcome: ACCEPTED when it won, ALREADY_ANSWERED when the same answer id
    won before; anything else that could not win is an error saying why (FAILED_PRECONDITION
    naming the winner, the expiry or the ended operation)."""
    if result.won:
        return AnswerOutcome.ACCEPTED
    resolved = result.request
    if resolved.outcome == "answered":
        if resolved.answer_id == answer_id:
            return AnswerOutcome.ALREADY_ANSWERED
        raise FailedPrecondition(
            f"input request {shown(request_id)} was already answered: answer_id "
            f"{shown(resolved.answer_id)} won ({describe(resolved.answer)}, "
            f"by {shown(resolved.answered_by or '')})"
        )
    if resolved.outcome == "expired":
        raise FailedPrecondition(
            f"input request {shown(request_id)} expired at "
            f"{resolved.expires_at.isoformat()} and took its default "
            f"({describe(resolved.answer)})"
        )
    raise FailedPrecondition(
        f"operation {operation_id} is {result.operation.status.value}: its input request "
        f"{shown(request_id)} can no longer be answered"
    )


def _match(value: JSONValue, schema: dict[str, Any] | None, field: str) -> None:
    if schema is None:
        return
    try:
        validator = jsonschema.Draft202012Validator(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except jsonschema.exceptions.SchemaError:
        return  # the agent's schema is broken: nothing to hold the answer to
    if error is None:
        return
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    raise InvalidArgument(field + path, error.message)


def describe(answer: dict[str, Any] | None) -> str:
    """An answer in a caller's terms, for messages."""
    if answer is None:
        return "no answer"
    if "approved" in answer:
        if not answer["approved"]:
            reason = answer.get("reason") or ""
            return f"rejected: {reason}" if reason else "rejected"
        return "approved with edited arguments" if "arguments" in answer else "approved"
    return f"value {shown(answer.get('value'))}"
