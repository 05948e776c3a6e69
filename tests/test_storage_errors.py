"""Which storage failures a retry can fix: UNAVAILABLE for those, INTERNAL for the rest.

sqlite3 raises OperationalError both for a file another connection holds locked (a retry
succeeds) and for a table that is not there (no retry does); psycopg raises it only for the
first kind. Each dialect says which is which (errors.py,
sqlite.py), from the driver's own error, here real ones.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio
from sqlalchemy.exc import DBAPIError

from runtime_service.storage import SqliteStorage, StorageError
from runtime_service.storage.errors import unreachable
from runtime_service.storage.sqlite import sqlite_retry_can_fix
from stopline.errors import Unavailable
from stopline.v1 import runtime_service_pb2 as pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.conftest import opened_storage


def _raised(run: Callable[[], object]) -> DBAPIError:
    """The sqlite3 error `run` raises, as SQLAlchemy hands it to storage."""
    with pytest.raises(sqlite3.Error) as caught:
        run()
    error = DBAPIError.instance(None, None, caught.value, sqlite3.Error)
    assert isinstance(error, DBAPIError)
    return error


def _locked(path: Path) -> DBAPIError:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        return _raised(lambda: other.execute("BEGIN IMMEDIATE"))
    finally:
        other.close()
        holder.execute("ROLLBACK")
        holder.close()


def _query_error(path: Path, sql: str) -> DBAPIError:
    db = sqlite3.connect(path)
    try:
        return _raised(lambda: db.execute(sql))
    finally:
        db.close()


def _missing_table(path: Path) -> DBAPIError:
    return _query_error(path, "SELECT * FROM no_such_table")


def _not_a_database(path: Path) -> DBAPIError:
    path.write_bytes(b"this is a text file, not a SQLite database\n" * 100)
    return _query_error(path, "SELECT * FROM sqlite_master")


def test_sqlite_errors_a_retry_can_fix_and_those_it_cannot(tmp_path: Path) -> None:
    locked = _locked(tmp_path / "locked.db")
    missing = _missing_table(tmp_path / "empty.db")
    garbage = _not_a_database(tmp_path / "garbage.db")
    # A locked file and a missing table are both OperationalError to sqlite3 (and SQLAlchemy):
    # only the code tells them apart. (A file that is not a database is a DatabaseError.)
    for error in (locked, missing):
        assert type(error).__name__ == "OperationalError", error
    assert sqlite_retry_can_fix(locked)
    assert not sqlite_retry_can_fix(missing)
    assert not sqlite_retry_can_fix(garbage)
    # The server databases' rule is unchanged: every OperationalError is worth a retry.
    assert unreachable(missing)


async def test_sqlite_storage_reports_each_as_its_kind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    storage = await opened_storage(url)
    assert isinstance(storage, SqliteStorage)
    try:
        before = storage.meters.unavailable._value.get()
        busy = storage._translation(_locked(tmp_path / "other.db"))
        assert isinstance(busy, Unavailable)
        assert storage.meters.unavailable._value.get() == before + 1
        for error in (_missing_table(tmp_path / "x.db"), _not_a_database(tmp_path / "y.db")):
            translated = storage._translation(error)
            assert isinstance(translated, StorageError), translated
        assert storage.meters.unavailable._value.get() == before + 1  # not counted as unreachable
    finally:
        await storage.close()


async def test_a_runtime_on_a_database_without_its_tables_answers_internal_not_unavailable(
    sqlite_url: str, stub: rt_grpc.RuntimeServiceAsyncStub
) -> None:
    """What a client sees of it: a retry cannot help, so the answer must not invite one."""
    op_id = str(uuid.uuid4())
    with pytest.raises(aio.AioRpcError) as unknown:
        await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND  # the runtime works: no such id
    db = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        db.execute("ALTER TABLE operations RENAME TO operations_moved_away")
    finally:
        db.close()
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))
    assert caught.value.code() is grpc.StatusCode.INTERNAL, caught.value.details()
    assert "no_such" not in (caught.value.details() or "")  # no SQL on the wire
    assert "the server log has the details" in (caught.value.details() or "")
