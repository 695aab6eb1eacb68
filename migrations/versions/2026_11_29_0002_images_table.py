"""images of a task in their own table (several per task); model options, usage, can_cancel

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:10:00

A task's image moves from the tasks row to `images` (position 0), keeping its
stored key, hash and download state; `tasks.image_status` stays as the summary
that listings filter on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import app.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (column in images, column it came from in tasks)
_MOVED = [
    ("status", "image_status"),
    ("source_url", "image_source_url"),
    ("source_expires_at", "image_source_expires_at"),
    ("renewed", "image_renewed"),
    ("attempts", "image_attempts"),
    ("next_attempt_at", "image_next_attempt_at"),
    ("lease_owner", "image_lease_owner"),
    ("lease_until", "image_lease_until"),
    ("key", "image_key"),
    ("content_type", "image_content_type"),
    ("size_bytes", "image_size_bytes"),
    ("sha256", "image_sha256"),
    ("width", "image_width"),
    ("height", "image_height"),
    ("stored_at", "image_stored_at"),
    ("error_code", "image_error_code"),
    ("error_message", "image_error_message"),
]


def _tasks_image_columns() -> list[sa.Column[object]]:
    utc = app.models.UTCDateTime(timezone=True)
    return [
        sa.Column("image_source_url", sa.Text(), nullable=True),
        sa.Column("image_source_expires_at", utc, nullable=True),
        sa.Column("image_renewed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("image_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("image_next_attempt_at", utc, nullable=True),
        sa.Column("image_lease_owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("image_lease_until", utc, nullable=True),
        sa.Column("image_key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("image_content_type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("image_size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("image_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("image_width", sa.Integer(), nullable=True),
        sa.Column("image_height", sa.Integer(), nullable=True),
        sa.Column("image_stored_at", utc, nullable=True),
        sa.Column("image_error_code", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("image_error_message", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    utc = app.models.UTCDateTime(timezone=True)
    op.create_table(
        "images",
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("source_url", sa.Text(), nullable=True),
        sa.Column("source_expires_at", utc, nullable=True),
        sa.Column("renewed", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", utc, nullable=True),
        sa.Column("lease_owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("lease_until", utc, nullable=True),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("content_type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("stored_at", utc, nullable=True),
        sa.Column("error_code", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", utc, nullable=False),
        sa.Column("updated_at", utc, nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("task_id", "position"),
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.create_index(
            "ix_images_status_next_attempt", ["status", "next_attempt_at"], unique=False
        )

    targets = ", ".join(name for name, _ in _MOVED)
    sources = ", ".join(source for _, source in _MOVED)
    op.execute(
        f"INSERT INTO images (task_id, position, {targets}, created_at, updated_at) "  # noqa: S608
        f"SELECT id, 0, {sources}, COALESCE(completed_at, updated_at), updated_at "
        "FROM tasks WHERE image_status IS NOT NULL"
    )

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_image_next_attempt_at")
        for column in _tasks_image_columns():
            batch_op.drop_column(column.name)
        batch_op.add_column(
            sa.Column("resolution", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True)
        )
        batch_op.add_column(sa.Column("n", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("mask_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("can_cancel", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("usage", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        for name in ("usage", "can_cancel", "mask_url", "n", "resolution"):
            batch_op.drop_column(name)
        for column in _tasks_image_columns():
            batch_op.add_column(column)
        batch_op.create_index(
            "ix_tasks_image_next_attempt_at", ["image_status", "image_next_attempt_at"]
        )
    # Only the first image of each task fits the old layout.
    assignments = ", ".join(
        f"{source} = (SELECT {name} FROM images "  # noqa: S608
        "WHERE images.task_id = tasks.id AND images.position = 0)"
        for name, source in _MOVED
        if source != "image_status"
    )
    op.execute(
        f"UPDATE tasks SET {assignments} "  # noqa: S608
        "WHERE EXISTS (SELECT 1 FROM images WHERE images.task_id = tasks.id)"
    )
    op.drop_table("images")
