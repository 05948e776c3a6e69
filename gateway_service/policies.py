"""What a client's cancelled stream does to its operation (DESIGN.md, the gateway): the policy
chosen at start, stored as labels on the operation so that any gateway applies it, and the
stop's reasons when the STOP policy applies. Gateway.start_and_stream stores it; the gateway's
policy handling (core.py) reads it back; the servicer maps the wire's enum onto it."""

from __future__ import annotations

import enum
from collections.abc import Mapping

POLICY_LABEL = "stopline.cancel_policy"
GRACE_LABEL = "stopline.cancel_grace_seconds"

# The stop's reason when the STOP policy stops an operation whose client left: the servicer
# tells a call the client cancelled (or whose connection broke) from one whose deadline expired.
CLIENT_CANCELLED = "the client's stream was cancelled"
CLIENT_DEADLINE = "the client's deadline expired"


class CancelPolicy(enum.StrEnum):
    STOP = "stop"
    KEEP_RUNNING = "keep_running"
    STOP_AFTER_GRACE = "stop_after_grace"


def policy_from_labels(labels: Mapping[str, str]) -> tuple[CancelPolicy, float]:
    """The cancel policy chosen at start, stored with the operation so any gateway applies it."""
    try:
        policy = CancelPolicy(labels.get(POLICY_LABEL, CancelPolicy.STOP))
    except ValueError:
        policy = CancelPolicy.STOP
    try:
        grace = float(labels.get(GRACE_LABEL, "0"))
    except ValueError:
        grace = 0.0
    return policy, grace
