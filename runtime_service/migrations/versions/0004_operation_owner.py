"""operation owner: idempotency keys scoped per owner

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing operations get owner '' (none): only a caller without an owner sees them, and
    # their idempotency keys stay unique within that empty owner.
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("owner", sa.String(length=200), nullable=False, server_default="")
        )
        batch_op.drop_constraint("uq_operations_idempotency_key", type_="unique")
        batch_op.create_unique_constraint(
            batch_op.f("uq_operations_owner_idempotency_key"), ["owner", "idempotency_key"]
        )
        batch_op.create_index(
            batch_op.f("ix_operations_owner_created_at_id"),
            ["owner", "created_at", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_owner_created_at_id"))
        batch_op.drop_constraint(batch_op.f("uq_operations_owner_idempotency_key"), type_="unique")
        batch_op.create_unique_constraint("uq_operations_idempotency_key", ["idempotency_key"])
        batch_op.drop_column("owner")
