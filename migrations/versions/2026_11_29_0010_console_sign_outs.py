"""console sessions ended by sign-out

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 14:40:00

A console session cookie is signed and carries its expiry; signing out records its
id here so the cookie stops working on every replica, not only in the browser that
deleted it. Rows are removed once the session would have expired anyway.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import app.models

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_sign_outs",
        sa.Column("session_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("caller", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("expires_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("signed_out_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_console_sign_outs")),
    )
    op.create_index("ix_console_sign_outs_expires_at", "console_sign_outs", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_console_sign_outs_expires_at", table_name="console_sign_outs")
    op.drop_table("console_sign_outs")
