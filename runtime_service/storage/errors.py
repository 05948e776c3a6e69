"""Storage failures as domain errors, at the storage boundary.

Inside storage, drivers' errors travel as SQLAlchemy's (the engines, the raw cursors and the
batcher all raise DBAPIError); here, where they leave storage, they become
`stopline.errors.Unavailable` when the database cannot be reached (a retry can succeed: RPCs
answer UNAVAILABLE, a run is left for recovery), and `StorageError` otherwise (a bug: INTERNAL).
Which failures a retry can outlast is each dialect's to say (`Unreachable`; SQLite's in
sqlite.py): a driver's OperationalError means an unreachable server to psycopg, but to sqlite3
it also means a missing table.
Nothing above storage knows which database library is underneath.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from stopline.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(Exception):
    """A storage failure other than an unreachable database (a broken statement, a violated
    constraint): not the caller's fault, and not one a retry fixes."""


# What a caller catches to treat any storage failure alike (the runner: leave the run as it is).
STORAGE_FAILURES: tuple[type[Exception], ...] = (Unavailable, StorageError)

UNAVAILABLE_MESSAGE = "the database is unavailable; retry shortly"


# Whether a failure means the database cannot be reached or take the work right now.
Unreachable = Callable[[SQLAlchemyError], bool]


def unreachable(exc: SQLAlchemyError) -> bool:
    """The rule for a server database (psycopg raises OperationalError for a lost connection, a
    server shutting down, a cancelled statement or a deadlock: all of them worth a retry)."""
    return isinstance(exc, OperationalError | DisconnectionError | PoolTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def as_domain_error(exc: SQLAlchemyError, retry_can_fix: Unreachable = unreachable) -> Exception:
    if retry_can_fix(exc):
        log.warning("database unavailable: %s", exc)
        return Unavailable(UNAVAILABLE_MESSAGE)
    return StorageError(str(exc))


def translation(
    exc: BaseException,
    on_unavailable: Callable[[], None] | None = None,
    retry_can_fix: Unreachable = unreachable,
) -> BaseException:
    """What `exc` leaves storage as: a domain error for SQLAlchemy's, itself otherwise."""
    if not isinstance(exc, SQLAlchemyError):
        return exc
    error = as_domain_error(exc, retry_can_fix)
    if on_unavailable is not None and isinstance(error, Unavailable):
        on_unavailable()
    error.__cause__ = exc
    return error


class translated:  # lower case: used like the function it was, `with translated(...)`
    """Around every storage call that leaves storage. `on_unavailable`: told of each failure
    to reach the database (the metrics). A class rather than a generator-based context manager:
    it wraps each of the runner's writes, and the generator's set-up cost more than the rest."""

    __slots__ = ("_on_unavailable", "_retry_can_fix")

    def __init__(
        self,
        on_unavailable: Callable[[], None] | None = None,
        retry_can_fix: Unreachable = unreachable,
    ) -> None:
        self._on_unavailable = on_unavailable
        self._retry_can_fix = retry_can_fix

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, SQLAlchemyError):
            raise translation(exc, self._on_unavailable, self._retry_can_fix) from exc
