"""The migrations build the schema the models describe: an index or column added to
one and not the other would otherwise surface only as a slow plan or a failed write
on a database that was migrated rather than created in a test."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import app.models  # noqa: F401  (the tables, registered on the metadata)
from app.db import create_engine


def _differences(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), SQLModel.metadata))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_migrated_database_has_the_schema_the_models_describe(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as db:
            differences = await db.run_sync(_differences)
    finally:
        await engine.dispose()
    assert differences == []
