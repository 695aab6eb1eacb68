"""webhooks: every secret still in its grace period; a task URL that answered 410

Revision ID: 0009
Revises: 0007
Create Date: 2026-11-29 14:30:00

An endpoint kept one previous secret, so a second rotation dropped the first
before its grace period ended: `previous_secrets` holds each one with its end
(the newest few). A task's webhook_url that answered 410 Gone is remembered
(`webhook_gone_at`), so events recorded later are not queued for it.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

import app.models

revision: str = "0009"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ENDPOINTS = sa.table(
    "webhook_endpoints",
    sa.column("id", sa.String()),
    sa.column("previous_secret", sa.String()),
    sa.column("previous_secret_until", app.models.UTCDateTime(timezone=True)),
    sa.column("previous_secrets", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("webhook_gone_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("previous_secrets", sa.JSON(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            _ENDPOINTS.c.id, _ENDPOINTS.c.previous_secret, _ENDPOINTS.c.previous_secret_until
        ).where(_ENDPOINTS.c.previous_secret.is_not(None))
    ).all()
    for row in rows:
        until: datetime | None = row.previous_secret_until
        if until is None:
            continue
        bind.execute(
            sa.update(_ENDPOINTS)
            .where(_ENDPOINTS.c.id == row.id)
            .values(previous_secrets=[{"secret": row.previous_secret, "until": until.isoformat()}])
        )
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("previous_secret_until")
        batch.drop_column("previous_secret")


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(
            sa.Column("previous_secret", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch.add_column(
            sa.Column("previous_secret_until", app.models.UTCDateTime(timezone=True), nullable=True)
        )
    bind = op.get_bind()
    for row in bind.execute(
        sa.select(_ENDPOINTS.c.id, _ENDPOINTS.c.previous_secrets).where(
            _ENDPOINTS.c.previous_secrets.is_not(None)
        )
    ).all():
        newest = (row.previous_secrets or [None])[0]
        if newest:
            bind.execute(
                sa.update(_ENDPOINTS)
                .where(_ENDPOINTS.c.id == row.id)
                .values(
                    previous_secret=newest["secret"],
                    previous_secret_until=datetime.fromisoformat(newest["until"]),
                )
            )
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("previous_secrets")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("webhook_gone_at")
