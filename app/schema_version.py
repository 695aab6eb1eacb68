"""Whether the database schema is the one this code expects, and migrating it.

The expected revision (Alembic's head) is read from the migration scripts once per
process; a check is then one small query on `alembic_version`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import create_engine

ROOT = Path(__file__).resolve().parent.parent
MIGRATE_HINT = "run `imagetasks migrate`"


def migrations_dir() -> Path:
    """The migration scripts: inside the package in a wheel, beside it in a checkout."""
    packaged = Path(__file__).resolve().parent / "migrations"
    return packaged if packaged.is_dir() else ROOT / "migrations"


@lru_cache(maxsize=1)
def head_revisions() -> frozenset[str]:
    """The revision(s) the code expects, from the migration scripts (read once)."""
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory(str(migrations_dir())).get_heads())


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    """Every revision the migration scripts define (read once)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(migrations_dir()))
    return frozenset(script.revision for script in scripts.walk_revisions())


class SchemaNewerThanCode(Exception):
    """The database records a revision these migration scripts do not know."""


@dataclass(frozen=True)
class SchemaStatus:
    """What `alembic_version` says, against what the code expects."""

    applied: frozenset[str] | None  # None: no alembic_version table (never migrated)
    head: frozenset[str]

    @property
    def current(self) -> bool:
        return self.applied == self.head

    @property
    def unknown(self) -> frozenset[str]:
        """Applied revisions the code does not know: a newer release migrated the database."""
        return frozenset(self.applied or ()) - known_revisions()

    def describe(self) -> str:
        """One line for an operator; says what to do when the schema is not current."""
        head = _names(self.head)
        if self.applied is None or not self.applied:
            return f"no schema (expected revision {head}): {MIGRATE_HINT}"
        if self.current:
            return f"schema at revision {head}"
        if self.unknown:
            return (
                f"schema at revision {_names(self.applied)}, newer than this code "
                f"(which expects {head}): run the release that migrated it"
            )
        return f"schema at revision {_names(self.applied)}, expected {head}: {MIGRATE_HINT}"


def _names(revisions: frozenset[str]) -> str:
    return ", ".join(sorted(revisions))


async def applied_revisions(connection: AsyncConnection) -> frozenset[str] | None:
    """The revisions recorded in the database; None if it was never migrated."""
    has_table = await connection.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))
    if not has_table:
        return None
    rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
    return frozenset(str(row[0]) for row in rows)


# Probes that come while the first read is out wait for it rather than read again.
_READING = threading.Lock()


def _read_scripts() -> frozenset[str]:
    """The head revision(s), with every known revision read too (both cached)."""
    with _READING:
        known_revisions()
        return head_revisions()


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    """The database's schema status; connection errors propagate (the database is down)."""
    async with engine.connect() as connection:
        applied = await applied_revisions(connection)
    # The first read of the scripts takes seconds on a busy machine: not on the loop.
    head = await asyncio.to_thread(_read_scripts)
    return SchemaStatus(applied, head)


async def _status_at(database_url: str) -> SchemaStatus:
    engine = create_engine(database_url)
    try:
        return await schema_status(engine)
    finally:
        await engine.dispose()


def migrate(database_url: str) -> str:
    """`alembic upgrade head` on the URL; returns what it did, in one line.

    Starts its own event loops: call it from a thread without a running loop.
    """
    from alembic import command
    from alembic.config import Config

    before = asyncio.run(_status_at(database_url))
    if before.unknown:
        raise SchemaNewerThanCode(before.describe())
    ini = ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    head = _names(before.head)
    if before.current:
        return f"the schema is already current (revision {head})"
    if not before.applied:
        return f"created the schema (revision {head})"
    return f"upgraded the schema from revision {_names(before.applied)} to {head}"
