"""The webhook's general path on PostgreSQL's autocommit connection: its writes commit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app import repository
from app.callback_urls import sign
from app.db import create_engine, create_session_factory, statement_commits
from app.services import callbacks
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]


async def test_a_callback_that_fails_to_be_recorded_leaves_the_task_as_it_was(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal callback for a `submitting` task whose delivery row cannot be written
    (the request answers 500) changes nothing: no adopted id, no confirmation request."""
    settings = make_settings(postgres_database, tmp_path, confirm_callbacks=True)
    engine = create_engine(postgres_database)
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(session, status="submitting", upstream_task_id=None)

        async def broken(db: Any, values: dict[str, Any]) -> None:
            raise ConnectionResetError("the connection dropped before the delivery was written")

        monkeypatch.setattr(repository, "insert_delivery", broken)
        body = dumps(task_body("completed", upstream_id="task-unified-1757156493-adopted"))
        with pytest.raises(ConnectionResetError):
            async with statement_commits(engine) as db:
                await callbacks.receive_callback(
                    db, settings, task.id, sign(task.id, WEBHOOK_SECRET), body
                )
        async with engine.connect() as db:
            row = (
                await db.execute(
                    text("SELECT upstream_task_id, confirm_requested_at FROM tasks WHERE id = :id"),
                    {"id": task.id},
                )
            ).one()
    finally:
        await engine.dispose()
    assert tuple(row) == (None, None)
