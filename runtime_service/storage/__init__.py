"""Storage: one interface (interface.py), one implementation per SQL dialect (sqlite.py,
postgres.py) over what they share (shared.py, claims.py, waiting.py, pausing.py), chosen once,
by open_storage."""

from __future__ import annotations

from runtime_service.database import Database
from runtime_service.metrics import StorageMetrics
from runtime_service.storage.errors import STORAGE_FAILURES, StorageError
from runtime_service.storage.interface import (
    Appended,
    ClaimBatch,
    Claimed,
    ClaimFor,
    Created,
    ExpiredBatch,
    KeptState,
    ListCursor,
    NewRequest,
    StepRecord,
    Storage,
    Tombstone,
)
from runtime_service.storage.postgres import PostgresStorage
from runtime_service.storage.records import ABANDONED, STOPPING, utcnow
from runtime_service.storage.sqlite import SqliteStorage

__all__ = [
    "ABANDONED",
    "STOPPING",
    "STORAGE_FAILURES",
    "Appended",
    "ClaimBatch",
    "ClaimFor",
    "Claimed",
    "Created",
    "ExpiredBatch",
    "KeptState",
    "ListCursor",
    "NewRequest",
    "PostgresStorage",
    "SqliteStorage",
    "StepRecord",
    "Storage",
    "StorageError",
    "Tombstone",
    "open_storage",
    "utcnow",
]


def open_storage(
    db: Database, database_url: str, meters: StorageMetrics | None = None
) -> SqliteStorage | PostgresStorage:
    """The implementation for the database's dialect (the one place that looks at it).
    `meters`: the runtime's storage metrics (a registry of their own when not given)."""
    dialect = db.engine.dialect
    if dialect.name == "sqlite":
        return SqliteStorage(db, meters)
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return PostgresStorage(db, database_url, meters)
    raise NotImplementedError(
        f"no storage for {dialect.name}+{dialect.driver}; use sqlite:/// or postgresql+psycopg://"
    )
