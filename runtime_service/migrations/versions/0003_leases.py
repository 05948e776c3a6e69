"""leases and holds: several runtime replicas share one database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import runtime_service.schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "lease_expires_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.add_column(
            sa.Column(
                "held_until", runtime_service.schema.UTCDateTime(timezone=True), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_column("held_until")
        batch_op.drop_column("lease_expires_at")
