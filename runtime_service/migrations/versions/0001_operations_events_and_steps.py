"""operations events and steps

Revision ID: 0001
Revises:
Create Date: 2026-11-25 10:44:48.321296
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import runtime_service.schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("agent", sa.String(length=200), nullable=False),
        sa.Column("input_json", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("steps_completed", sa.Integer(), nullable=False),
        sa.Column("agent_state_json", sa.Text(), nullable=True),
        sa.Column("result_json", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("runner_id", sa.String(length=100), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column(
            "stop_requested_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("stop_requested_by", sa.String(length=200), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("created_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operations")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_operations_idempotency_key")),
    )
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_operations_created_at_id"), ["created_at", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_operations_status_created_at_id"),
            ["status", "created_at", "id"],
            unique=False,
        )

    op.create_table(
        "events",
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("data_json", sa.Text(), nullable=False),
        sa.Column("created_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["operations.id"], name=op.f("fk_events_operation_id_operations")
        ),
        sa.PrimaryKeyConstraint("operation_id", "seq", name=op.f("pk_events")),
    )
    op.create_table(
        "steps",
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("runner_id", sa.String(length=100), nullable=False),
        sa.Column("started_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", runtime_service.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("output_json", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["operations.id"], name=op.f("fk_steps_operation_id_operations")
        ),
        sa.PrimaryKeyConstraint("operation_id", "step", "attempt", name=op.f("pk_steps")),
    )


def downgrade() -> None:
    op.drop_table("steps")
    op.drop_table("events")
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_status_created_at_id"))
        batch_op.drop_index(batch_op.f("ix_operations_created_at_id"))

    op.drop_table("operations")
