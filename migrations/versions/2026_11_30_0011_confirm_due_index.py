"""an index for the confirmation claim

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 08:40:00

The worker's confirmation claim takes the due tasks a callback asked about, oldest
due first. Through the `next_poll_at` index it read past every task due for a
routine poll first, thousands after a provider outage. This partial index holds
only the tasks waiting for a confirmation.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WAITING = sa.text("confirm_requested_at IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_tasks_confirm_due",
        "tasks",
        ["next_poll_at"],
        postgresql_where=_WAITING,
        sqlite_where=_WAITING,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_confirm_due", table_name="tasks")
