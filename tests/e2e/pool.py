"""Where the end-to-end stacks' databases and directories come from.

``Databases`` hands out empty, migrated databases: a copy of the migrated SQLite
template, or a PostgreSQL database cloned from a migrated template database.
``StackPool`` starts stacks on them and stops them all at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

from app.cli import run_migrations
from tests.e2e.stack import Stack
from tests.postgres import (
    POSTGRES_URL,
    REQUIRE_POSTGRES,
    admin,
    dsn,
    in_thread,
    postgres_reachable,
    run_async,
)


class Databases:
    """Hands out empty, migrated databases; drops the PostgreSQL ones at the end."""

    def __init__(self, sqlite_template: Path, label: str = "e2e") -> None:
        self._sqlite_template = sqlite_template
        self._pg_template: str | None = None
        self._created: list[str] = []
        self._label = label
        self._prefix = f"imagetasks_{label}_{os.getpid()}_{secrets.token_hex(2)}"

    def _postgres_template(self) -> str:
        if self._pg_template is None:
            problem = run_async(postgres_reachable)
            if problem:
                message = f"PostgreSQL at {POSTGRES_URL} is unreachable ({problem})"
                if REQUIRE_POSTGRES:
                    pytest.fail(message)
                pytest.skip(message)
            run_async(_drop_orphans, self._label)
            name = f"{self._prefix}_template"
            run_async(admin, f'CREATE DATABASE "{name}"')
            self._created.append(name)
            in_thread(run_migrations, self._url(name))
            self._pg_template = name
        return self._pg_template

    @staticmethod
    def _url(name: str) -> str:
        return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    def create(self, kind: str, directory: Path) -> str:
        """A new database of this kind ("sqlite" or "postgres"); its async URL."""
        if kind == "sqlite":
            path = directory / "imagetasks.db"
            shutil.copy(self._sqlite_template, path)
            return f"sqlite+aiosqlite:///{path}"
        template = self._postgres_template()
        name = f"{self._prefix}_{len(self._created)}"
        run_async(admin, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self._created.append(name)
        return self._url(name)

    def drop_all(self) -> None:
        """Drop every PostgreSQL database handed out (the template last)."""
        for name in reversed(self._created):
            run_async(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _drop_orphans(label: str) -> None:
    """Drop databases left by test sessions that were killed before their teardown."""
    connection = await asyncpg.connect(dsn(POSTGRES_URL))
    try:
        names = await connection.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            f"imagetasks\\_{label}\\_%",
        )
        for (name,) in names:
            pid = name.split("_")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


class StackPool:
    """Starts stacks in numbered directories and stops them all on ``close``."""

    def __init__(self, databases: Databases, root: Path, kind: str) -> None:
        self._databases = databases
        self._root = root
        self.kind = kind
        self._stacks: list[Stack] = []

    async def start(self, **service_env: str | int | float | bool) -> Stack:
        """A running stack on a fresh database of the pool's kind."""
        directory = self._root / f"stack{len(self._stacks)}"
        directory.mkdir(parents=True)
        stack = Stack(directory, self._databases.create(self.kind, directory), **service_env)
        self._stacks.append(stack)
        return await stack.start()

    async def close(self) -> None:
        """Stop every stack, newest first."""
        for stack in reversed(self._stacks):
            await stack.close()
