"""operation trace parent: the start's W3C traceparent, continued by the operation's runs

Revision ID: 0010
Revises: 0007
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
# At merge: the newest revision before this one (0008 and 0009 are other branches' work).
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing operations have none (NULL): their runs begin traces of their own.
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trace_parent", sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_column("trace_parent")
