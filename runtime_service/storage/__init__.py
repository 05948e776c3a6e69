"""Storage: one interface (interface.py), one implementation per SQL dialect (sqlite.py,
postgres.py) over what they share (shared.py), chosen once, by open_storage."""

from __future__ import annotations

from runtime_service.database import Database
from runtime_service.storage.errors import STORAGE_FAILURES, StorageError
from runtime_service.storage.interface import (
    ABANDONED,
    STOPPING,
    Appended,
    ClaimBatch,
    Claimed,
    Created,
    KeptState,
    ListCursor,
    NewRequest,
    StepRecord,
    Storage,
    utcnow,
)
from runtime_service.storage.postgres import PostgresStorage
from runtime_service.storage.sqlite import SqliteStorage

__all__ = [
    "ABANDONED",
    "STOPPING",
    "STORAGE_FAILURES",
    "Appended",
    "ClaimBatch",
    "Claimed",
    "Created",
    "KeptState",
    "ListCursor",
    "NewRequest",
    "PostgresStorage",
    "SqliteStorage",
    "StepRecord",
    "Storage",
    "StorageError",
    "open_storage",
    "utcnow",
]


def open_storage(db: Database, database_url: str) -> SqliteStorage | PostgresStorage:
    """The implementation for the database's dialect (the one place that looks at it)."""
    dialect = db.engine.dialect
    if dialect.name == "sqlite":
        return SqliteStorage(db)
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return PostgresStorage(db, database_url)
    raise NotImplementedError(
        f"no storage for {dialect.name}+{dialect.driver}; use sqlite:/// or postgresql+psycopg://"
    )
