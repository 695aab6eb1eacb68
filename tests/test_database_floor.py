"""The service needs SQLite 3.35+ (RETURNING, `AS MATERIALIZED`) and PostgreSQL 12+
(`AS MATERIALIZED`, which every poll claim, download claim and retention prune uses):
an older database is refused up front, by name, not by a syntax error in a loop later."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app import cli, db
from app.db import DatabaseTooOld, create_engine


def test_an_sqlite_library_older_than_3_35_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(DatabaseTooOld, match=r"SQLite 3\.34\.1.*3\.35"):
        create_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")


def test_migrate_says_the_sqlite_library_is_too_old(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    result = CliRunner().invoke(cli.cli, ["migrate"])
    assert result.exit_code == 1
    assert "SQLite 3.31.1" in result.output


def test_the_sqlite_library_in_use_passes() -> None:
    assert sqlite3.sqlite_version_info >= db.SQLITE_FLOOR


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.postgres
async def test_a_postgres_server_below_the_floor_is_refused_on_connect(
    monkeypatch: pytest.MonkeyPatch, postgres_database: str
) -> None:
    engine = create_engine(postgres_database)
    try:
        async with engine.connect():
            pass  # the server in use passes
        await engine.dispose()
        monkeypatch.setattr(db, "POSTGRES_FLOOR", 99)
        with pytest.raises(DatabaseTooOld, match=r"PostgreSQL \d+.*99"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
