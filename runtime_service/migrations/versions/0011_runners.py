"""runners: where each live runtime replica can be reached, for stops sent straight to the owner

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from runtime_service.schema import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runners",
        sa.Column("runner_id", sa.String(length=100), primary_key=True),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("seen_at", UTCDateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("runners")
