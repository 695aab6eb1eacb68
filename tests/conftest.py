"""Shared fixtures: databases built by the real migrations (SQLite file and
PostgreSQL server), settings, and the service app over ASGI."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import structlog
from fastapi import FastAPI
from sqlalchemy import text

from app.cli import run_migrations
from app.config import Settings, load_settings
from app.logging import configure_logging
from app.main import create_app
from app.runtime import Runtime
from app.upstream import RetryPolicy
from tests.postgres import (
    POSTGRES_URL,
    REQUIRE_POSTGRES,
    admin,
    dsn,
    in_thread,
    postgres_reachable,
    run_async,
    server_database_url,
)

API_TOKEN = "test-token-" + "a" * 20
WEBHOOK_SECRET = "test-webhook-secret-0123456789"
FAST_RETRY = RetryPolicy(base_delay=0.0, max_delay=0.0)
TABLES = (
    "callback_deliveries",
    "idempotency_records",
    "tasks",
    "events",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "task_activity",
)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    in_thread(run_migrations, f"sqlite+aiosqlite:///{path}")
    return path


async def _truncate(url: str) -> None:
    connection = await asyncpg.connect(dsn(url))
    try:
        await connection.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, migrated, dropped at the end."""
    problem = run_async(postgres_reachable)
    if problem:
        message = f"PostgreSQL at {POSTGRES_URL} is unreachable ({problem})"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    name = f"imagetasks_test_{os.getpid()}_{secrets.token_hex(3)}"
    run_async(admin, f'CREATE DATABASE "{name}"')
    url = server_database_url(name)
    try:
        in_thread(run_migrations, url)
        yield url
    finally:
        run_async(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """An empty, migrated database: a SQLite file, then the PostgreSQL server."""
    if request.param == "sqlite":
        path = tmp_path / "imagetasks.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite+aiosqlite:///{path}"
    url: str = request.getfixturevalue("postgres_database")
    run_async(_truncate, url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """Just SQLite, for tests that are about something other than the database."""
    path = tmp_path / "imagetasks.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


def make_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an in-process service under test."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "storage_url": f"file://{tmp_path / 'images'}",
        "starmagic_base_url": "http://starmagic.test",
        "starmagic_api_key": "sim-key",
        "public_base_url": "https://imagetasks.test/base",
        "webhook_secret": WEBHOOK_SECRET,
        "api_tokens": f"{API_TOKEN},second-token-bbbbbbbbbbbbbbbbbb",
        "run_background": False,
        "reconcile_after_seconds": 120,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings on the parametrized database."""
    return make_settings(database_url, tmp_path)


class Service:
    """The app under test, its runtime and an authenticated client."""

    def __init__(self, app: FastAPI, runtime: Runtime, client: httpx.AsyncClient) -> None:
        self.app = app
        self.runtime = runtime
        self.client = client

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one SQL statement and return its rows (for assertions)."""
        async with self.runtime.engine.connect() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []


@pytest_asyncio.fixture
async def service_factory() -> AsyncIterator[Callable[..., Any]]:
    """Build the app around given settings and an upstream transport."""
    stack: list[Any] = []

    async def build(settings: Settings, upstream: httpx.AsyncBaseTransport) -> Service:
        http = httpx.AsyncClient(transport=upstream, timeout=5)
        runtime = Runtime.build(settings, http=http, retry=FAST_RETRY)
        # No worker runs beside an in-process app: it confirms callbacks itself, as the
        # single-process deployment does (tests of the worker's batches say otherwise).
        runtime.confirms_in_process = True
        app = create_app(settings, runtime=runtime)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        stack.append(lifespan)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="https://imagetasks.test",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        stack.append(client)
        return Service(app, runtime, client)

    yield build
    for item in reversed(stack):
        if isinstance(item, httpx.AsyncClient):
            await item.aclose()
        else:
            await item.__aexit__(None, None, None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> Iterator[None] | None:
    """Mark e2e and chaos tests by their folder, so `-m` selects them."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
        if "chaos" in parts:
            item.add_marker(pytest.mark.chaos)
    return None


LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def capture_logs(tmp_path: Path) -> Iterator[LogLines]:
    """The app's JSON log lines so far, parsed; call it after acting."""
    configure_logging(
        make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", tmp_path, log_format="json")
    )
    # A logger cached now would keep this configuration for good, out of the reach of
    # later tests' `structlog.testing.capture_logs`.
    structlog.configure(cache_logger_on_first_use=False)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()
