"""waiting for a person: input requests, the pause intent, WAITING and PAUSED (status is a plain
string column, so the new statuses need no change of type)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import runtime_service.schema

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "input_requests",
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("request_json", sa.Text(), nullable=False),
        sa.Column("schema_json", sa.Text(), nullable=True),
        sa.Column("default_json", sa.Text(), nullable=False),
        sa.Column("expires_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("answer_id", sa.String(length=200), nullable=True),
        sa.Column("answer_json", sa.Text(), nullable=True),
        sa.Column("answered_by", sa.String(length=200), nullable=True),
        sa.Column("resolved_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
            name=op.f("fk_input_requests_operation_id_operations"),
        ),
        sa.PrimaryKeyConstraint("operation_id", "request_id", name=op.f("pk_input_requests")),
    )
    op.create_index(
        op.f("ix_input_requests_outcome_expires_at"),
        "input_requests",
        ["outcome", "expires_at"],
        unique=False,
    )
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_request_id", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column(
                "pause_requested_at",
                runtime_service.schema.UTCDateTime(timezone=True),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("pause_requested_by", sa.String(length=200), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_operations_status_deadline_at"), ["status", "deadline_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_status_deadline_at"))
        batch_op.drop_column("pause_requested_by")
        batch_op.drop_column("pause_requested_at")
        batch_op.drop_column("input_request_id")
    op.drop_index(op.f("ix_input_requests_outcome_expires_at"), table_name="input_requests")
    op.drop_table("input_requests")
