"""an index on the age of idempotency records

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 10:30:00

Idempotency records are keyed by caller and key. The retention prune picks the
expired ones a batch at a time; without an index on their age each batch read
every record.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_idempotency_records_created_at", "idempotency_records", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_records_created_at", table_name="idempotency_records")
