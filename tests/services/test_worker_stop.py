"""Stopping the worker: a round under way finishes its statement, so the stop never
leaves a connection broken in the middle of a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from app import repository
from app import worker as worker_module
from app.models import utcnow
from app.webhooks import outbox
from app.worker import BackgroundWorker
from tests.conftest import LogLines, Service, make_settings
from tests.e2e.stack import wait_for
from tests.factories import make_image, make_task
from tests.helpers import simulator_transport
from tests.services.test_downloads import ScriptedFetcher

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


def silent_provider() -> httpx.MockTransport:
    """A provider that takes every query and never answers."""

    async def never(_: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return httpx.MockTransport(never)


async def build(
    service_factory: Any,
    database_url: str,
    tmp_path: Path,
    provider: httpx.AsyncBaseTransport | None = None,
) -> Service:
    """The service, its provider the simulator unless given."""
    transport = provider or simulator_transport()[0]
    service: Service = await service_factory(make_settings(database_url, tmp_path), transport)
    return service


async def an_image(service: Service, **fields: Any) -> None:
    """A completed task's image, due for its download unless `fields` say otherwise."""
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed")
        await make_image(session, task.id, **fields)


async def due_for_a_poll(service: Service, **fields: Any) -> None:
    """A processing task due for its next poll (a confirmation, if `fields` ask one)."""
    async with service.runtime.sessions() as session:
        await make_task(session, status="processing", next_poll_at=utcnow(), **fields)


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """The stop's grace shortened to a few seconds (rounds get one); its length."""
    grace = 3.0
    monkeypatch.setattr(worker_module, "STOP_GRACE_SECONDS", grace)
    monkeypatch.setattr(worker_module, "ROUND_GRACE_SECONDS", 1.0)
    return grace


async def poll_claimed(service: Service) -> bool:
    return bool(await service.sql("SELECT 1 FROM tasks WHERE poll_claimed_at IS NOT NULL"))


async def assert_the_lease_was_given_back(service: Service, logs: list[dict[str, Any]]) -> None:
    [stopped] = [line for line in logs if line["event"] == "worker_stopped"]
    assert stopped["released_leases"] == 1
    assert await service.sql("SELECT lease_owner FROM images") == [(None,)]


async def test_a_stop_during_a_statement_lets_it_finish_then_gives_back_the_leases(
    service_factory: Any,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capture_logs: LogLines,
) -> None:
    """The stop comes while the webhook loop's claim runs a statement: cancelled there,
    SQLite's connection kept its transaction and the write lock (every writer then
    waited, the leases were not given back, the stop took 20 s). The round finishes
    its statement instead, and the loop ends at its next look at the stop."""
    service = await build(service_factory, database_url, tmp_path)
    worker = BackgroundWorker(service.runtime, download_poll_seconds=600)
    # A download this worker holds (its next attempt far off: no loop claims it).
    await an_image(
        service,
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

    await worker.start()
    monkeypatch.setattr(outbox, "claim_due", slow_claim)
    worker._written.ring(None)  # as an event notice does
    await asyncio.wait_for(claiming.wait(), timeout=30)
    await asyncio.wait_for(worker.stop(), timeout=30)
    logs = capture_logs()
    assert finished.is_set()
    assert [line for line in logs if line["level"] in ("warning", "error")] == []
    await assert_the_lease_was_given_back(service, logs)
    if database_url.startswith("sqlite"):
        assert sqlite_write_lock_free(database_url)


async def test_a_round_waiting_on_the_provider_does_not_hold_the_stop(
    service_factory: Any, database_url: str, tmp_path: Path, capture_logs: LogLines
) -> None:
    """The reconciler waits on a provider that does not answer (its queries may take
    30 s): past a short grace the round is cancelled (a network wait, where a cancel
    breaks nothing), not waited on for the whole of the stop's time."""
    service = await build(service_factory, database_url, tmp_path, silent_provider())
    await due_for_a_poll(service)
    worker = BackgroundWorker(service.runtime, download_poll_seconds=600)
    await worker.start()
    await wait_for(lambda: poll_claimed(service), what="the poll's claim")
    await asyncio.wait_for(worker.stop(), timeout=worker_module.STOP_GRACE_SECONDS / 2)
    logs = capture_logs()
    cancelled = [line["loop"] for line in logs if line["event"] == "loop_cancelled_at_stop"]
    assert cancelled == ["reconciler"]
    assert "worker_stopped" in [line["event"] for line in logs]


async def test_a_download_claimed_as_the_stop_comes_is_not_started_and_is_given_back(
    service_factory: Any,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capture_logs: LogLines,
) -> None:
    """The stop comes while the download loop's claim is under way: the round ends
    without starting what it claimed, and the stop gives the lease back."""
    service = await build(service_factory, database_url, tmp_path)
    fetcher = ScriptedFetcher([b"never fetched"])
    monkeypatch.setattr(service.runtime, "fetcher", fetcher)
    await an_image(service)
    claiming, go_on = asyncio.Event(), asyncio.Event()
    claim_due_downloads = repository.claim_due_downloads

    async def held_claim(*args: Any, **kwargs: Any) -> Any:
        claiming.set()
        await go_on.wait()  # the statement, still running when the stop comes
        return await claim_due_downloads(*args, **kwargs)

    monkeypatch.setattr(repository, "claim_due_downloads", held_claim)
    worker = BackgroundWorker(service.runtime, download_poll_seconds=600)
    await worker.start()
    await asyncio.wait_for(claiming.wait(), timeout=30)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)  # the stop has begun
    go_on.set()
    await asyncio.wait_for(stopping, timeout=30)
    logs = capture_logs()
    assert fetcher.urls == []
    await assert_the_lease_was_given_back(service, logs)


async def test_the_stop_waits_for_rounds_and_jobs_within_one_grace(
    service_factory: Any,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    short_grace: float,
) -> None:
    """A round on a silent provider and a download that does not end: the stop's grace
    covers both together, not one after the other."""
    service = await build(service_factory, database_url, tmp_path, silent_provider())
    fetcher = ScriptedFetcher([b"slow"], delay=3600)
    monkeypatch.setattr(service.runtime, "fetcher", fetcher)
    await due_for_a_poll(service)
    await an_image(service)
    worker = BackgroundWorker(service.runtime, download_poll_seconds=600)
    await worker.start()
    await wait_for(lambda: poll_claimed(service), what="the poll's claim")

    async def fetching() -> bool:
        return bool(fetcher.urls)

    await wait_for(fetching, what="the download's fetch")
    # One grace and some room for a busy machine; two graces in a row would not fit.
    await asyncio.wait_for(worker.stop(), timeout=short_grace * 1.8)
    assert fetcher.finished == 0


async def test_a_confirmation_under_way_ends_within_the_stop_grace(
    service_factory: Any,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    short_grace: float,
) -> None:
    """A confirmation's query is out to a silent provider when the stop comes: it ends
    within the worker's one grace, so closing the runtime after the worker does not
    wait again (it waited up to 15 s more, past a 30 s termination grace)."""
    service = await build(service_factory, database_url, tmp_path, silent_provider())
    await due_for_a_poll(
        service, upstream_task_id="up_confirm_at_stop", confirm_requested_at=utcnow()
    )
    worker = BackgroundWorker(service.runtime, download_poll_seconds=600)

    async def no_regular_polls() -> None:  # the confirmation loop alone claims the task
        return None

    monkeypatch.setattr(worker, "_reconcile_round", no_regular_polls)
    await worker.start()
    await wait_for(lambda: poll_claimed(service), what="the confirmation's claim")

    async def stop_then_close() -> None:  # as the service's shutdown does
        await worker.stop()
        await service.runtime.reconciler.aclose()

    # One grace and some room for a busy machine; the reconciler's own wait would not fit.
    await asyncio.wait_for(stop_then_close(), timeout=short_grace * 1.8)
    assert await service.sql("SELECT status FROM tasks") == [("processing",)]
