"""events.seq never reused on SQLite

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 11:50:00

SQLite hands out max(rowid) + 1 unless the table is AUTOINCREMENT, so once
retention had deleted every event, new events took positions that cursors
already issued had passed. The table is rebuilt with AUTOINCREMENT (rows kept).
PostgreSQL's sequence never goes back: nothing to do there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "events", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
