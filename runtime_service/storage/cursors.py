"""Raw DBAPI cursors from the engine's pool, and the reads every dialect shares as fixed SQL.

Why not SQLAlchemy Core for the frequent statements (the runner's writes, the reads watchers
repeat): they run several times per step, and building, cache-keying and compiling Core
statements, plus the Connection layer around them, cost several times the database work itself
(`python -m bench.write_path` measures it). Fixed SQL lets the drivers keep their own prepared
statements (sqlite3's statement cache, psycopg's automatic server-side prepare).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from runtime_service.domain import Event, EventKind, Operation
from runtime_service.rows import operation_from_row
from runtime_service.schema import UTCDateTime, operations, sqlite_utc_text
from runtime_service.storage.sql import Sql

# Every column, by name (cursor.description), so the row maps whatever the schema holds.
_GET = Sql("SELECT * FROM operations WHERE id = :id")
_BY_KEY = Sql("SELECT * FROM operations WHERE owner = :owner AND idempotency_key = :key")
_EVENTS_AFTER = Sql("""
SELECT seq, kind, data_json, created_at FROM events
WHERE operation_id = :id AND seq > :after ORDER BY seq LIMIT :limit""")

# Every column of an operation, in a fixed order, for statements that return a whole row.
COLUMNS = tuple(column.name for column in operations.c)
COLUMN_LIST = ", ".join(COLUMNS)
_TIME_COLUMNS = tuple(c.name for c in operations.c if isinstance(c.type, UTCDateTime))


class Cursors:
    """Cursors on pooled connections, without SQLAlchemy's Connection around them (that
    wrapper costs more than these statements). Pool pre-ping still replaces connections that
    died, and driver errors are re-raised as SQLAlchemy's (see errors.py for where they become
    domain errors)."""

    def __init__(self, engine: Engine, paramstyle: str) -> None:
        self.engine = engine
        dialect = engine.dialect
        self._postgres = dialect.name == "postgresql"
        self._paramstyle = paramstyle  # "named" (sqlite3) or "pyformat" (psycopg)
        # The column type's own conversions, as the dialect applies them (SQLite keeps text).
        column_type = UTCDateTime().dialect_impl(dialect)
        to_db: Any = column_type.bind_processor(dialect)
        if dialect.name == "sqlite":
            to_db = sqlite_utc_text  # the same text, a third of the cost
        self.to_db: Any = to_db if to_db is not None else (lambda value: value)
        from_db = column_type.result_processor(dialect, None)
        self.from_db: Any = from_db if from_db is not None else (lambda value: value)
        self.dbapi: Any = dialect.loaded_dbapi

    def sql(self, statement: Sql) -> str:
        """The statement's text in this driver's parameter style."""
        return statement.text if self._paramstyle == "named" else statement.pyformat

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside a transaction that commits when the block ends."""
        with self._raw(autocommit=False) as cursor:
            if not self._postgres:
                cursor.execute("BEGIN IMMEDIATE")  # as database.py's engines do, see there
            yield cursor

    @contextmanager
    def read(self) -> Iterator[Any]:
        # One SELECT is consistent on its own: no transaction to open (SQLite's connections
        # are in autocommit mode, see database.py) or to commit.
        with self._raw(autocommit=self._postgres) as cursor:
            yield cursor

    @contextmanager
    def _raw(self, autocommit: bool) -> Iterator[Any]:
        try:
            fairy = self.engine.raw_connection()
        except self.dbapi.Error as exc:  # cannot even connect: the database is unavailable
            raise DBAPIError.instance(None, None, exc, self.dbapi.Error) from exc
        driver = fairy.driver_connection
        cursor = None
        try:
            if autocommit:
                driver.autocommit = True  # type: ignore[union-attr]
            cursor = fairy.cursor()
            yield cursor
            if not autocommit:
                fairy.commit()
        except self.dbapi.Error as exc:
            _rollback(fairy)
            if self.engine.dialect.is_disconnect(exc, fairy, cursor):
                fairy.invalidate(exc)
            raise DBAPIError.instance(None, None, exc, self.dbapi.Error) from exc
        except BaseException:
            _rollback(fairy)
            raise
        finally:
            if cursor is not None:
                cursor.close()
            if autocommit and fairy.is_valid:
                driver.autocommit = False  # type: ignore[union-attr]
            fairy.close()  # back to the pool

    # -------------------------------------------------------------------- reads

    def get(self, operation_id: str) -> Operation | None:
        with self.read() as cur:
            return self.get_in(cur, operation_id)

    def get_in(self, cur: Any, operation_id: str) -> Operation | None:
        cur.execute(self.sql(_GET), {"id": operation_id})
        row = self.row(cur)
        return None if row is None else operation_from_row(row)

    def events_after(self, operation_id: str, after_seq: int, limit: int) -> list[Event]:
        with self.read() as cur:
            cur.execute(
                self.sql(_EVENTS_AFTER), {"id": operation_id, "after": after_seq, "limit": limit}
            )
            rows = cur.fetchall()
        from_db = self.from_db
        return [
            Event(operation_id, seq, EventKind(kind), json.loads(data), from_db(created_at))
            for seq, kind, data, created_at in rows
        ]

    def find_by_key(self, owner: str, key: str) -> SimpleNamespace | None:
        """The owner's operation with this idempotency key, as a row (with request_hash)."""
        with self.read() as cur:
            return self.find_by_key_in(cur, owner, key)

    def find_by_key_in(self, cur: Any, owner: str, key: str) -> SimpleNamespace | None:
        """`find_by_key` inside the caller's transaction."""
        cur.execute(self.sql(_BY_KEY), {"owner": owner, "key": key})
        return self.row(cur)

    def row(self, cur: Any) -> SimpleNamespace | None:
        """The next row of an operations query, by column name, with timestamps converted."""
        row = cur.fetchone()
        if row is None:
            return None
        return self.named([column[0] for column in cur.description], row)

    def named(self, names: Sequence[str], row: Sequence[Any]) -> SimpleNamespace:
        values = dict(zip(names, row, strict=True))
        for name in _TIME_COLUMNS:
            values[name] = self.from_db(values[name])
        return SimpleNamespace(**values)

    def operation(self, row: Sequence[Any]) -> Operation:
        """An operation from a row that starts with COLUMNS."""
        return operation_from_row(self.named(COLUMNS, row[: len(COLUMNS)]))


def _rollback(fairy: Any) -> None:
    with contextlib.suppress(Exception):  # already gone: the pool replaces it
        fairy.rollback()
