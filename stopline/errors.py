"""Domain errors. Each names the gRPC status it maps to in exactly one place (errors_to_status)."""

from __future__ import annotations


class StoplineError(Exception):
    """Base of every error the domain raises on purpose; the message is shown to the caller."""


class InvalidArgument(StoplineError):
    """The request is malformed; `field` names what the caller must fix."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class OutOfRange(StoplineError):
    """A position beyond what exists (e.g. after_seq past the newest event)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(StoplineError):
    """No such operation (or, for callers who may not see it, one that is not theirs)."""


def operation_not_found(operation_id: str) -> NotFound:
    """The one answer for an unknown id *and* for another owner's operation: byte-identical, so
    a caller cannot tell whether an id it does not own exists."""
    return NotFound(f"operation {operation_id} does not exist")


class Unauthenticated(StoplineError):
    """No credentials, or credentials that do not check out; the message says what to fix and
    never which keys or principals exist."""


class AlreadyExists(StoplineError):
    """An idempotency key was reused for a different request."""


class FailedPrecondition(StoplineError):
    """The request is well-formed but the operation's state refuses it for good (an input request
    answered differently or expired, a watch of events retention deleted); the message says what
    the state is, and retrying will not help."""


class ResourceExhausted(StoplineError):
    """A configured limit was reached; the message names the limit."""


class DeadlineExceeded(StoplineError):
    """A server-side time limit ran out (e.g. a stream stayed idle too long); the message says
    how to carry on, so a client can tell it apart from "too many" (ResourceExhausted)."""


class Unavailable(StoplineError):
    """A dependency (the database) cannot be reached right now; retrying later can succeed."""
