"""`imagetasks migrate` says what it did, and fails in one line when it cannot."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from app.db import create_engine
from app.schema_version import ROOT, head_revisions, migrations_dir, schema_status
from tests.ports import free_port

from .helpers import clean_env, run_cli


def test_migrate_creates_then_reports_current(tmp_path: Path) -> None:
    """A new database is created at the head; a second run changes nothing and says so."""
    head = ", ".join(sorted(head_revisions()))
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    first = run_cli("migrate", env=env, cwd=tmp_path, timeout=120)
    assert first.code == 0, first.stderr
    assert first.stdout.strip() == f"imagetasks: created the schema (revision {head})"
    again = run_cli("migrate", env=env, cwd=tmp_path, timeout=120)
    assert again.code == 0, again.stderr
    assert again.stdout.strip() == f"imagetasks: the schema is already current (revision {head})"


def test_migrate_an_older_schema_names_both_revisions(tmp_path: Path) -> None:
    """A database one revision behind is upgraded, and the line says from what to what."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    (head,) = head_revisions()
    previous = ScriptDirectory(str(migrations_dir())).get_revision(head).down_revision
    assert isinstance(previous, str)
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, previous)
    result = run_cli("migrate", env=clean_env(DATABASE_URL=url), cwd=tmp_path, timeout=120)
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == (
        f"imagetasks: upgraded the schema from revision {previous} to {head}"
    )


def test_migrate_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    """Nothing listening at DATABASE_URL: exit 1 and one line, not a traceback."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
    result = run_cli("migrate", env=clean_env(DATABASE_URL=url), cwd=tmp_path, timeout=120)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagetasks: cannot migrate the database: ")


def test_migrate_refuses_an_impossible_database_url_in_one_line(tmp_path: Path) -> None:
    """A sync driver or an unparseable DATABASE_URL: exit 2 and one line, as serve says it."""
    for url, reason in (
        ("postgresql://postgres@127.0.0.1/x", "use an async driver: postgresql+asyncpg://…"),
        ("garbage", "must start with sqlite+aiosqlite:// or postgresql+asyncpg://"),
    ):
        result = run_cli("migrate", env=clean_env(DATABASE_URL=url), cwd=tmp_path, timeout=120)
        assert result.code == 2, result.stderr
        assert result.stderr.strip().splitlines() == [f"imagetasks: DATABASE_URL: {reason}"]


def _stamp_newer(path: Path) -> None:
    """Record a revision these scripts do not know, as a newer release's migrate would."""
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")


def test_migrate_a_schema_newer_than_the_code_is_one_line(tmp_path: Path) -> None:
    """A database migrated by a newer release: exit 1, one line saying so, no traceback."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}"
    env = clean_env(DATABASE_URL=url)
    assert run_cli("migrate", env=env, cwd=tmp_path, timeout=120).code == 0
    _stamp_newer(tmp_path / "newer.db")
    result = run_cli("migrate", env=env, cwd=tmp_path, timeout=120)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "9999_from_the_future" in lines[0]
    assert "newer" in lines[0]


@pytest.mark.asyncio
async def test_a_schema_newer_than_the_code_is_not_told_to_migrate(tmp_path: Path) -> None:
    """Readiness names the unknown revision and does not advise `imagetasks migrate`."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}"
    assert run_cli("migrate", env=clean_env(DATABASE_URL=url), cwd=tmp_path, timeout=120).code == 0
    _stamp_newer(tmp_path / "newer.db")
    engine = create_engine(url)
    try:
        status = await schema_status(engine)
    finally:
        await engine.dispose()
    assert not status.current
    described = status.describe()
    assert "9999_from_the_future" in described
    assert "newer" in described
    assert "imagetasks migrate" not in described


def test_the_sandbox_that_cannot_migrate_says_so_in_one_line(tmp_path: Path) -> None:
    """`serve --sandbox` where ./var cannot be a directory: exit 1, one line, no traceback."""
    (tmp_path / "var").write_text("a file where the data directory should be")
    result = run_cli("serve", "--sandbox", "--port", "1", env=clean_env(), cwd=tmp_path, timeout=60)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == "imagetasks: cannot migrate the database: [Errno 17] File exists: 'var'"
