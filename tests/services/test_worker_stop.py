"""Stopping the worker: a round under way finishes its statement, so the stop never
leaves a connection broken in the middle of a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from app.models import utcnow
from app.webhooks import outbox
from app.worker import BackgroundWorker
from tests.conftest import make_settings
from tests.factories import make_image, make_task
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")

# A statement that runs a while on either database.
SLOW = {
    "sqlite": "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 300000)"
    " SELECT count(*) FROM n",
    "postgresql": "SELECT pg_sleep(0.3)",
}


def sqlite_write_lock_free(database_url: str) -> bool:
    other = sqlite3.connect(make_url(database_url).database or "", timeout=0.1)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


async def test_a_stop_during_a_statement_lets_it_finish_then_gives_back_the_leases(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop comes while the webhook loop's claim runs a statement: cancelled there,
    SQLite's connection kept its transaction and the write lock (every writer then
    waited, the leases were not given back, the stop took 20 s). The round finishes
    its statement instead, and the loop ends at its next look at the stop."""
    transport, _ = simulator_transport()
    service = await service_factory(make_settings(database_url, tmp_path), transport)
    worker = BackgroundWorker(service.runtime, download_poll_seconds=600)
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed")
        # A download this worker holds (its next attempt far off: no loop claims it).
        await make_image(
            session,
            task.id,
            lease_owner=f"{worker.downloader.owner}/1",
            lease_until=utcnow() + timedelta(minutes=5),
            next_attempt_at=utcnow() + timedelta(hours=1),
        )
    claiming, finished = asyncio.Event(), asyncio.Event()

    async def slow_claim(db: Any, **_: Any) -> list[Any]:
        claiming.set()
        await db.exec_driver_sql(SLOW[db.dialect.name])
        finished.set()
        return []

    with capture_logs() as logs:
        await worker.start()
        monkeypatch.setattr(outbox, "claim_due", slow_claim)
        worker._written.ring(None)  # as an event notice does
        await asyncio.wait_for(claiming.wait(), timeout=30)
        await asyncio.wait_for(worker.stop(), timeout=30)
    assert finished.is_set()
    assert [line for line in logs if line["log_level"] in ("warning", "error")] == []
    [stopped] = [line for line in logs if line["event"] == "worker_stopped"]
    assert stopped["released_leases"] == 1
    assert await service.sql("SELECT lease_owner FROM images") == [(None,)]
    if database_url.startswith("sqlite"):
        assert sqlite_write_lock_free(database_url)
