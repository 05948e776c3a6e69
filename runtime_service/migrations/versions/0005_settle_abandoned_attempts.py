"""settle attempts abandoned before takeovers settled them

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 19:20:00

Before this version an attempt whose runner died mid-step kept no finish time and no outcome
forever. Now the takeover (or the halt of a stopped orphan) settles it as `abandoned`; this does
the same for the rows left by older versions: every unfinished attempt of an operation that has
ended, or that a later attempt superseded. (An operation still RUNNING keeps its newest attempt
open: it may be running right now, and its takeover settles it if not.) Data only: the schema is
unchanged.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SETTLE = """
UPDATE steps SET outcome = 'abandoned',
  finished_at = (
    SELECT coalesce(o.finished_at, o.updated_at) FROM operations o WHERE o.id = steps.operation_id
  )
WHERE finished_at IS NULL AND (
  EXISTS (
    SELECT 1 FROM operations o
    WHERE o.id = steps.operation_id AND o.status IN ('COMPLETED', 'FAILED', 'INTERRUPTED')
  )
  OR EXISTS (
    SELECT 1 FROM steps later
    WHERE later.operation_id = steps.operation_id
      AND (later.step > steps.step OR (later.step = steps.step AND later.attempt > steps.attempt))
  )
)"""


def upgrade() -> None:
    op.execute(SETTLE)


def downgrade() -> None:
    pass  # the settled rows were wrong before; nothing to restore
