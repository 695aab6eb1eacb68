"""`imagetasks migrate` says what it did, and fails in one line when it cannot."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from app.schema_version import ROOT, head_revisions, migrations_dir
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
