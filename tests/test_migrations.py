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


def test_attempts_left_open_by_older_versions_are_settled(db_url: str) -> None:
    """0005: an attempt abandoned by a crash before takeovers settled attempts is settled as
    `abandoned`, unless it may still be running (the newest attempt of a RUNNING operation)."""
    from alembic import command
    from sqlalchemy import insert, select

    from runtime_service.migrate import alembic_config
    from runtime_service.schema import operations, steps
    from runtime_service.storage import utcnow

    engine = create_db_engine(db_url)
    try:
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004")
        now = utcnow()
        with engine.begin() as conn:
            for op_id, status, finished in (("ended", "COMPLETED", now), ("live", "RUNNING", None)):
                conn.execute(
                    insert(operations).values(
                        id=op_id,
                        agent="ticker",
                        input_json="{}",
                        request_hash="-",
                        status=status,
                        steps_completed=1,
                        last_seq=9,
                        created_at=now,
                        updated_at=now,
                        finished_at=finished,
                    )
                )
            started = {"runner_id": "r", "started_at": now}
            conn.execute(
                insert(steps),
                [
                    {"operation_id": "ended", "step": 0, "attempt": 1, **started},
                    {"operation_id": "ended", "step": 0, "attempt": 2, **started},
                    {"operation_id": "live", "step": 0, "attempt": 1, **started},
                    {"operation_id": "live", "step": 1, "attempt": 1, **started},
                ],
            )
            conn.execute(
                steps.update()
                .where(steps.c.operation_id == "ended", steps.c.attempt == 2)
                .values(finished_at=now, outcome="completed")
            )
        upgrade_to_head(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                select(steps.c.operation_id, steps.c.step, steps.c.attempt, steps.c.outcome)
                .where(steps.c.finished_at.is_not(None))
                .order_by(steps.c.operation_id, steps.c.step, steps.c.attempt)
            ).all()
        assert [tuple(r) for r in rows] == [
            ("ended", 0, 1, "abandoned"),
            ("ended", 0, 2, "completed"),
            ("live", 0, 1, "abandoned"),  # superseded by step 1
        ]  # ("live", 1, 1) may still be running: left open
    finally:
        engine.dispose()
