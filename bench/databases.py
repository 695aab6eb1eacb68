"""Benchmark databases: created fresh and migrated, seeded in bulk, dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from app.cli import run_migrations
from app.db import create_engine
from app.models import Image, Task
from tests.postgres import dsn, in_thread

POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL",
    os.environ.get("TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
)
INSERT_BATCH = 5000


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(dsn(POSTGRES_URL), timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def postgres_available() -> str | None:
    """None when the server answers, else why not."""
    try:
        in_thread(lambda: asyncio.run(_admin("SELECT 1")))
    except (OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class Database:
    kind: str  # "sqlite" or "postgres"
    url: str


@contextmanager
def fresh_database(kind: str, workdir: Path, label: str) -> Iterator[Database]:
    """A new database built by the real migrations; removed on exit."""
    if kind == "sqlite":
        path = workdir / f"{label}.db"
        url = f"sqlite+aiosqlite:///{path}"
        in_thread(run_migrations, url)
        try:
            yield Database(kind, url)
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = f"imagetasks_bench_{label}_{os.getpid()}_{secrets.token_hex(3)}"
    in_thread(lambda: asyncio.run(_admin(f'CREATE DATABASE "{name}"')))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        in_thread(run_migrations, url)
        yield Database(kind, url)
    finally:
        in_thread(lambda: asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))


async def insert_tasks(
    url: str, rows: list[dict[str, Any]], images: list[dict[str, Any]] | None = None
) -> None:
    """Bulk insert task rows (and image rows), as the tables spell them, in batches."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            for table, batch in ((Task.__table__, rows), (Image.__table__, images or [])):  # type: ignore[attr-defined]
                for start in range(0, len(batch), INSERT_BATCH):
                    await connection.execute(insert(table), batch[start : start + INSERT_BATCH])
        # Fresh statistics, as autovacuum would have them on a table this old.
        async with engine.begin() as connection:
            await connection.exec_driver_sql("ANALYZE")
    finally:
        await engine.dispose()


def task_row(**fields: Any) -> dict[str, Any]:
    """A full tasks row with the model's defaults, as the table's column names spell them."""
    values: dict[str, Any] = {
        "status": "pending",
        "progress": 0,
        "prompt": "a lighthouse at dawn, watercolor",
        "model": "gpt-image-1.5",
        "size": "1:1",
        "quality": "medium",
        "image_urls": None,
        "metadata": {"source": "bench"},
        "owner": "bench",
        "upstream_task_id": None,
        "estimated_time": 100,
        "error_code": None,
        "error_message": None,
        "submit_outcome_unknown": False,
        "completed_at": None,
        "last_event_at": None,
        "next_poll_at": None,
        "poll_attempts": 0,
        "poll_lease_until": None,
        "image_status": None,
        "resolution": None,
        "n": 1,
        "mask_url": None,
        "can_cancel": None,
        "usage": None,
    }
    values.update(fields)
    return values
