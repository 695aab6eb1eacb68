"""Fixtures for the console's browser tests: Debian's chromium driven by Playwright,
against the real service (two replicas on PostgreSQL) and the simulator."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.conftest import e2e_databases
from tests.e2e.pool import Databases, StackPool
from tests.e2e.stack import Stack
from tests.postgres import REQUIRE_POSTGRES, postgres_reachable

__all__ = ["e2e_databases"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@dataclass
class Sandbox:
    """The stack, the second replica's URL, and where screenshots go."""

    stack: Stack
    replica_url: str
    shots: Path
    kind: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sandbox(
    e2e_databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Sandbox]:
    """Two service replicas on PostgreSQL (one on SQLite where there is no server)."""
    kind = "postgres"
    if problem := await postgres_reachable():
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is unreachable ({problem})")
        kind = "sqlite"
    root = tmp_path_factory.mktemp(f"console-{kind}")
    pool = StackPool(e2e_databases, root, kind)
    try:
        stack = await pool.start()
        replica = await stack.start_extra_service() if kind == "postgres" else stack.service_url
        shots = root / "screenshots"
        shots.mkdir()
        yield Sandbox(stack, replica, shots, kind)
    finally:
        await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    """Headless chromium; missing chromium fails under CI (it must run there) and skips
    elsewhere."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()
