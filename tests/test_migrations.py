"""Alembic migrations build exactly the schema the code declares, on every backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from runtime_service.database import create_db_engine
from runtime_service.migrate import upgrade_to_head
from runtime_service.schema import metadata


def test_migrations_match_schema_and_are_rerunnable(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        upgrade_to_head(engine)
        upgrade_to_head(engine)  # a second start-up finds nothing to do
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert {"operations", "events", "steps", "alembic_version"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    """Several replicas starting at once on one PostgreSQL database all come up."""
    from concurrent.futures import ThreadPoolExecutor

    engines = [create_db_engine(postgres_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(upgrade_to_head, engines))
        with engines[0].connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    finally:
        for engine in engines:
            engine.dispose()
