"""Who is calling: the authenticated principal of the gRPC call being served, in a context
variable of the call's own task.

A module of its own at the bottom, so that the authentication interceptors (stopline.authn),
which set it, and the log lines (stopline.logs), which carry it, both depend on it rather than
on each other.
"""

from __future__ import annotations

import contextvars

principal_var: contextvars.ContextVar[str] = contextvars.ContextVar("stopline_principal")


def current_principal() -> str:
    """The authenticated caller of the call being served. Raises LookupError outside an
    authenticated call, which the servicers' error mapping turns into INTERNAL (a wiring bug)."""
    return principal_var.get()
