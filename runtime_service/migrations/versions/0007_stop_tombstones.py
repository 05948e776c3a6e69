"""stop tombstones (a stop by idempotency key recorded before its start) and stop causes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import runtime_service.schema

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stop_tombstones",
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("cause", sa.String(length=32), nullable=False),
        sa.Column(
            "requested_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("expires_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", "idempotency_key", name=op.f("pk_stop_tombstones")),
    )
    op.create_index(
        op.f("ix_stop_tombstones_expires_at"), "stop_tombstones", ["expires_at"], unique=False
    )
    # Stops recorded before this version keep no cause (NULL: STOP_CAUSE_UNSPECIFIED).
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stop_cause", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_column("stop_cause")
    op.drop_index(op.f("ix_stop_tombstones_expires_at"), table_name="stop_tombstones")
    op.drop_table("stop_tombstones")
