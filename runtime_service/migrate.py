"""Bring a database to the newest schema with Alembic: run at start-up and by `runtime migrate`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


# Any constant shared by all replicas: the key of the advisory lock that serialises migrations.
MIGRATION_LOCK_KEY = 0x5709_11E0


def upgrade_to_head(engine: Engine) -> None:
    """Idempotent, and safe when several replicas start at once: on PostgreSQL they queue on an
    advisory lock held for the migration's transaction, and the later ones find nothing to do."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
