"""Fixtures for the end-to-end tests: fresh databases and running stacks.

Each stack gets a database of its own (see ``tests.e2e.pool``), PostgreSQL ones
dropped at the end of the session. ``db_kind`` is module-scoped, so a module's
tests share their stacks per database; ``stacks`` (per test) and
``module_stacks`` (per module) start stacks with extra service settings and
stop them afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e.pool import Databases, StackPool
from tests.e2e.stack import Stack


@pytest.fixture(scope="session")
def e2e_databases(sqlite_template: Path) -> Iterator[Databases]:
    """The session's database factory."""
    databases = Databases(sqlite_template)
    yield databases
    databases.drop_all()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db_kind(request: pytest.FixtureRequest) -> str:
    """Which database the module's stacks use: SQLite, then PostgreSQL."""
    kind: str = request.param
    return kind


@pytest_asyncio.fixture(loop_scope="session")
async def stacks(
    e2e_databases: Databases, db_kind: str, tmp_path: Path
) -> AsyncIterator[StackPool]:
    """Stacks for one test, stopped when it ends."""
    pool = StackPool(e2e_databases, tmp_path, db_kind)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_stacks(
    e2e_databases: Databases, db_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StackPool]:
    """Stacks shared by a module's tests on one database, stopped when it ends."""
    pool = StackPool(e2e_databases, tmp_path_factory.mktemp(f"e2e-{db_kind}"), db_kind)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(module_stacks: StackPool) -> Stack:
    """The module's stack with the default e2e settings."""
    return await module_stacks.start()


@pytest_asyncio.fixture(loop_scope="session")
async def postgres_stacks(e2e_databases: Databases, tmp_path: Path) -> AsyncIterator[StackPool]:
    """Stacks on PostgreSQL only (replicas need row locks), stopped when the test ends."""
    pool = StackPool(e2e_databases, tmp_path, "postgres")
    yield pool
    await pool.close()
