"""What the benchmark ran on: recorded with every result."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.databases import POSTGRES_URL
from tests.postgres import dsn, in_thread


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _postgres_version() -> str | None:
    import asyncio

    async def query() -> str:
        connection = await asyncpg.connect(dsn(POSTGRES_URL), timeout=5)
        try:
            return str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()

    try:
        return str(in_thread(lambda: asyncio.run(query())))
    except (OSError, asyncpg.PostgresError):
        return None


def _package(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def describe(tools: dict[str, str | None]) -> dict[str, Any]:
    """CPU, cores, memory, OS, kernel, Python and database versions, and the tools used."""
    load = os.getloadavg()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": _os(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "postgresql": _postgres_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average_at_start": [round(value, 2) for value in load],
        "packages": {
            name: _package(name)
            for name in (
                "fastapi",
                "uvicorn",
                "sqlalchemy",
                "asyncpg",
                "aiosqlite",
                "httpx",
                "uvloop",
            )
        },
        "tools": tools,
        "git_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or None,
    }
