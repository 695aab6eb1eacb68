"""`imagetasks migrate` says what it did, and fails in one line when it cannot."""

from __future__ import annotations

from pathlib import Path

from app.schema_version import head_revisions
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


def test_migrate_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    """Nothing listening at DATABASE_URL: exit 1 and one line, not a traceback."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
    result = run_cli("migrate", env=clean_env(DATABASE_URL=url), cwd=tmp_path, timeout=120)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagetasks: cannot migrate the database: ")
