"""the event log: one row per change a caller cares about

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 10:40:00

On PostgreSQL, `events.txid` defaults to the writing transaction's id (readers
serve only events of ended transactions), and an AFTER INSERT trigger sends a
NOTIFY on `imagetasks_events` so waiters in every process wake at commit.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import app.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_FUNCTION = """
CREATE FUNCTION imagetasks_notify_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'imagetasks_events',
        NEW.txid::text || ' ' || NEW.type || ' ' || NEW.task_id || ' ' || NEW.owner
    );
    RETURN NULL;
END
$$
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER events_notify AFTER INSERT ON events
FOR EACH ROW EXECUTE FUNCTION imagetasks_notify_event()
"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    txid_default = sa.text("(pg_current_xact_id()::text::bigint)") if postgres else sa.text("0")
    op.create_table(
        "events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False, server_default=txid_default),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_events")),
        sa.UniqueConstraint("id", name=op.f("uq_events_id")),
    )
    op.create_index("ix_events_order", "events", ["txid", "seq"])
    op.create_index("ix_events_owner_order", "events", ["owner", "txid", "seq"])
    op.create_index("ix_events_task", "events", ["task_id", "seq"])
    op.create_index("ix_events_created_at", "events", ["created_at"])
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("progress_event_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
    if postgres:
        op.execute(NOTIFY_FUNCTION)
        op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS events_notify ON events")
        op.execute("DROP FUNCTION IF EXISTS imagetasks_notify_event()")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("progress_event_at")
    op.drop_table("events")
