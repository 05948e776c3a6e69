"""event retention: when an operation's events expired, and the queue of their deletion

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import runtime_service.schema

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing operations keep their events (NULL) until retention expires them.
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "events_expired_at",
                runtime_service.schema.UTCDateTime(timezone=True),
                nullable=True,
            )
        )
        batch_op.create_index(
            batch_op.f("ix_operations_events_expired_at_finished_at"),
            ["events_expired_at", "finished_at"],
            unique=False,
        )
    op.create_table(
        "event_purges",
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("queued_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
            name=op.f("fk_event_purges_operation_id_operations"),
        ),
        sa.PrimaryKeyConstraint("operation_id", name=op.f("pk_event_purges")),
    )


def downgrade() -> None:
    op.drop_table("event_purges")
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_events_expired_at_finished_at"))
        batch_op.drop_column("events_expired_at")
