"""The PostgreSQL test server: where it is, whether it answers, and admin
statements run on their own event loop (safe from inside the tests' loop)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
# In CI the PostgreSQL tests must run: a missing server fails them instead of skipping.
REQUIRE_POSTGRES = os.environ.get("CI") == "true" or os.environ.get("REQUIRE_POSTGRES") == "1"


def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run a function that starts its own event loop (Alembic's env.py) off this one."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = function(*args)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def run_async(coro_function: Callable[..., Any], *args: Any) -> Any:
    """Run async set-up code on its own loop, away from the tests' loop."""
    return in_thread(lambda: asyncio.run(coro_function(*args)))


def dsn(url: str, database: str | None = None) -> str:
    """A SQLAlchemy URL as asyncpg wants it."""
    parsed = make_url(url).set(drivername="postgresql")
    if database:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def server_database_url(name: str) -> str:
    """The async URL of one database on the test server."""
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


async def postgres_reachable() -> str | None:
    """None when the server answers, else why not."""
    try:
        connection = await asyncpg.connect(dsn(POSTGRES_URL), timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await connection.close()
    return None


async def admin(statement: str) -> None:
    """One statement on the server's maintenance database (CREATE/DROP DATABASE)."""
    connection = await asyncpg.connect(dsn(POSTGRES_URL), timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()
