"""task activity (download attempts, provider queries) and the console's indexes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 13:40:00

`task_activity` keeps what no other table does: each download attempt's outcome
and each query to the provider, for a task's timeline. It is pruned with the
callback deliveries. The indexes let the console's overview read a 24-hour
window without scanning whole tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import app.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_activity",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("position", sa.Integer(), nullable=True),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_activity")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_task_activity_task", "task_activity", ["task_id", "id"])
    op.create_index("ix_task_activity_at", "task_activity", ["at"])
    op.create_index("ix_tasks_completed_at", "tasks", ["completed_at"])
    op.create_index("ix_images_stored_at", "images", ["stored_at"])
    op.create_index("ix_callback_deliveries_received_at", "callback_deliveries", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_callback_deliveries_received_at", table_name="callback_deliveries")
    op.drop_index("ix_images_stored_at", table_name="images")
    op.drop_index("ix_tasks_completed_at", table_name="tasks")
    op.drop_index("ix_task_activity_at", table_name="task_activity")
    op.drop_index("ix_task_activity_task", table_name="task_activity")
    op.drop_table("task_activity")
