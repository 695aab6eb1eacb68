"""Migration 0009 keeps an endpoint's previous secret (moved into previous_secrets) both ways."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import app.models
from app.schema_version import migrations_dir

UNTIL = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = UNTIL - timedelta(days=1)


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    return config


def _endpoints(*columns: sa.ColumnClause[object]) -> sa.TableClause:
    return sa.table("webhook_endpoints", sa.column("id", sa.String()), *columns)


def test_the_previous_secret_survives_upgrade_and_downgrade(tmp_path: Path) -> None:
    """Upgrading moves previous_secret into previous_secrets; downgrading moves it back."""
    path = tmp_path / "m.db"
    config = _config(f"sqlite+aiosqlite:///{path}")
    command.upgrade(config, "0006")
    engine = sa.create_engine(f"sqlite:///{path}")
    stamp = app.models.UTCDateTime(timezone=True)
    old = _endpoints(
        sa.column("previous_secret", sa.String()), sa.column("previous_secret_until", stamp)
    )
    with engine.begin() as db:
        db.execute(
            sa.insert(
                _endpoints(
                    sa.column("owner", sa.String()),
                    sa.column("url", sa.String()),
                    sa.column("event_types", sa.String()),
                    sa.column("enabled", sa.Boolean()),
                    sa.column("secret", sa.String()),
                    sa.column("previous_secret", sa.String()),
                    sa.column("previous_secret_until", stamp),
                    sa.column("created_at", stamp),
                    sa.column("updated_at", stamp),
                )
            ),
            {
                "id": "we_1",
                "owner": "o",
                "url": "https://x.example/h",
                "event_types": ",task.created,",
                "enabled": True,
                "secret": "whsec_new",
                "previous_secret": "whsec_old",
                "previous_secret_until": UNTIL,
                "created_at": NOW,
                "updated_at": NOW,
            },
        )
    command.upgrade(config, "0009")
    new = _endpoints(sa.column("previous_secrets", sa.JSON()))
    with engine.connect() as db:
        [moved] = db.execute(sa.select(new.c.previous_secrets)).scalars().all()
    assert [entry["secret"] for entry in moved] == ["whsec_old"]
    assert datetime.fromisoformat(moved[0]["until"]) == UNTIL
    command.downgrade(config, "0006")
    with engine.connect() as db:
        row = db.execute(sa.select(old.c.previous_secret, old.c.previous_secret_until)).one()
    assert (row.previous_secret, row.previous_secret_until) == ("whsec_old", UNTIL)
    engine.dispose()
