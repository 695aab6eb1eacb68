"""What operators rely on: metrics, request ids, readiness, proxies and prefixes."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app.callback_urls import sign
from app.schema_version import head_revisions, migrations_dir
from tests.conftest import API_TOKEN, WEBHOOK_SECRET, LogLines, Service, make_settings
from tests.helpers import dumps, simulator_transport, task_body
from tests.postgres import admin, postgres_reachable, run_async, server_database_url

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def build(service_factory: Any, sqlite_url: str, tmp_path: Path, **overrides: Any) -> Service:
    """The service on SQLite with an in-process simulator."""
    transport, _ = simulator_transport()
    settings = make_settings(sqlite_url, tmp_path, **overrides)
    service: Service = await service_factory(settings, transport)
    return service


async def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and labels."""
    text = (await service.client.get("/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_submissions_callbacks_and_provider_calls(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Counters and histograms move as requests are handled."""
    service = await build(service_factory, sqlite_url, tmp_path, confirm_callbacks=False)
    before = await scrape(service)
    task = (await service.client.post("/tasks", json={"prompt": "p"})).json()
    path = f"/webhooks/starmagic/{task['id']}/{sign(task['id'], WEBHOOK_SECRET)}"
    body = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
    await service.client.post(path, content=body)
    await service.client.post(path, content=body)
    await service.client.post(path, content=b"{")
    after = await scrape(service)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("imagetasks_submissions_total", outcome="accepted") == 1
    assert grew("imagetasks_callbacks_total", outcome="applied") == 1
    assert grew("imagetasks_callbacks_total", outcome="duplicate") == 1
    assert grew("imagetasks_callbacks_total", outcome="rejected") == 1
    assert grew("imagetasks_callback_handling_seconds_count") == 3
    assert grew("imagetasks_provider_request_seconds_count", operation="submit") == 1


async def test_request_ids_are_echoed_or_made(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A sane X-Request-ID comes back as sent; otherwise one is generated."""
    service = await build(service_factory, sqlite_url, tmp_path)
    given = await service.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    hostile = await service.client.get("/healthz", headers={"X-Request-ID": "a\tb" + "x" * 100})
    assert hostile.headers["x-request-id"] != "a\tb" + "x" * 100
    assert len(hostile.headers["x-request-id"]) == 16


async def test_readyz_reports_each_dependency(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Ready when database and storage answer; 503 naming the storage when it does not."""
    service = await build(service_factory, sqlite_url, tmp_path)
    ready = await service.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}
    images = tmp_path / "images"
    shutil.rmtree(images)
    images.write_text("a file where the image directory should be")
    broken = await service.client.get("/readyz")
    assert broken.status_code == 503
    assert broken.json()["checks"]["database"] == "ok"
    assert broken.json()["checks"]["storage"].startswith("unavailable: storage directory ")
    assert "is not writable" in broken.json()["checks"]["storage"]


@pytest.mark.parametrize(("trusted", "scheme"), [("10.9.9.9", "http"), ("127.0.0.1", "https")])
async def test_forwarded_headers_are_believed_only_from_trusted_proxies(
    service_factory: Any, sqlite_url: str, tmp_path: Path, trusted: str, scheme: str
) -> None:
    """X-Forwarded-Proto changes generated URLs only when the peer is a trusted proxy."""
    service = await build(service_factory, sqlite_url, tmp_path, trusted_proxies=trusted)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app, client=("127.0.0.1", 5000)),
        base_url="http://imagetasks.internal",
        headers={"Authorization": f"Bearer {API_TOKEN}", "X-Forwarded-Proto": "https"},
    )
    async with client:
        response = await client.post("/tasks", json={"prompt": "p"})
    assert response.headers["location"].startswith(f"{scheme}://imagetasks.internal/tasks/")


async def test_a_path_prefix_shows_in_generated_urls(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """With ROOT_PATH set, Location and image URLs carry the prefix."""
    service = await build(service_factory, sqlite_url, tmp_path, root_path="/imagetasks")
    response = await service.client.post("/tasks", json={"prompt": "p"})
    assert response.status_code == 202
    assert response.headers["location"] == (
        f"https://imagetasks.test/imagetasks/tasks/{response.json()['id']}"
    )


async def test_production_mode_never_mounts_the_simulator(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Without --sandbox the simulator's routes do not exist."""
    service = await build(service_factory, sqlite_url, tmp_path)
    for path in ("/_sandbox/starmagic/_sim/stats", "/_sandbox/starmagic/v1/tasks/x"):
        response = await service.client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert not any("_sandbox" in str(route) for route in service.app.routes)


async def test_an_unreachable_database_is_a_503_not_a_500(
    service_factory: Any, tmp_path: Path
) -> None:
    """With the database down, callers are told it is transient (503, Retry-After)."""
    settings = make_settings("postgresql+asyncpg://postgres@127.0.0.1:1/none", tmp_path)
    transport, _ = simulator_transport()
    service: Service = await service_factory(settings, transport)
    for method, path in (("POST", "/tasks"), ("GET", "/tasks"), ("GET", "/tasks/tsk_x")):
        response = await service.client.request(method, path, json={"prompt": "p"})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "database_unavailable"
        assert response.headers["retry-after"] == "5"
    ready = await service.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("unavailable")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database nobody migrated: an empty SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        empty = tmp_path / "empty.db"
        empty.touch()
        yield f"sqlite+aiosqlite:///{empty}"
        return
    problem = run_async(postgres_reachable)
    if problem:
        pytest.skip(f"PostgreSQL is unreachable ({problem})")
    name = f"imagetasks_unmigrated_{os.getpid()}_{secrets.token_hex(3)}"
    run_async(admin, f'CREATE DATABASE "{name}"')
    try:
        yield server_database_url(name)
    finally:
        run_async(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_an_unmigrated_database_is_not_ready_and_says_to_migrate(
    service_factory: Any, empty_database: str, tmp_path: Path, capture_logs: LogLines
) -> None:
    """An empty database: /readyz and every request say `imagetasks migrate`, logged once."""
    settings = make_settings(empty_database, tmp_path)
    service: Service = await service_factory(settings, simulator_transport()[0])
    ready = await service.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == (
        f"no schema (expected revision {', '.join(head_revisions())}): run `imagetasks migrate`"
    )
    for method, path in (("POST", "/tasks"), ("GET", "/tasks"), ("GET", "/tasks/tsk_x")):
        response = await service.client.request(method, path, json={"prompt": "p"})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "schema_not_current"
        assert response.json()["error"]["message"] == (
            f"the database is not ready: no schema (expected revision "
            f"{', '.join(head_revisions())}): run `imagetasks migrate`"
        )
    started = [e for e in capture_logs() if e["event"].startswith("database_outage")]
    assert [(e["event"], e["kind"]) for e in started] == [
        ("database_outage_started", "schema_not_current")
    ]
    assert not any("exception" in e for e in capture_logs())


async def test_a_database_at_another_revision_is_not_ready(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """An older schema names both revisions and says to migrate; a newer one says it is newer."""
    service = await build(service_factory, sqlite_url, tmp_path)
    (head,) = head_revisions()
    older = ScriptDirectory(str(migrations_dir())).get_revision(head).down_revision
    async with service.runtime.engine.begin() as connection:
        await connection.execute(
            text("UPDATE alembic_version SET version_num = :older"), {"older": older}
        )
    ready = await service.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == (
        f"schema at revision {older}, expected {head}: run `imagetasks migrate`"
    )
    async with service.runtime.engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = 'newer9999'"))
    ready = await service.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == (
        f"schema at revision newer9999, newer than this code (which expects {head}): "
        "run the release that migrated it"
    )


async def test_readiness_logs_a_change_not_every_probe(
    service_factory: Any, sqlite_url: str, tmp_path: Path, capture_logs: LogLines
) -> None:
    """A probe every few seconds during an outage writes one line, and one when it is over."""
    from app.storage import StorageError

    service = await build(service_factory, sqlite_url, tmp_path)
    working = service.runtime.storage.check

    async def broken() -> None:
        raise StorageError("bucket gone")

    service.runtime.storage.check = broken  # type: ignore[method-assign]
    for _ in range(5):
        assert (await service.client.get("/readyz")).status_code == 503
    service.runtime.storage.check = working  # type: ignore[method-assign]
    for _ in range(3):
        assert (await service.client.get("/readyz")).status_code == 200
    events = [e["event"] for e in capture_logs() if e.get("logger") == "app.api.health"]
    assert events == ["not_ready", "ready_again"]


async def test_the_first_probe_reads_the_migration_scripts_off_the_event_loop(
    service_factory: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the scripts is slow under load (seconds): other requests go on meanwhile."""
    import asyncio
    import threading
    import time

    import app.schema_version as schema_version

    service = await build(service_factory, sqlite_url, tmp_path)
    head_revisions.cache_clear()
    schema_version.known_revisions.cache_clear()
    reading = threading.Event()

    def slow_heads() -> frozenset[str]:
        reading.set()
        time.sleep(0.5)
        return head_revisions()

    monkeypatch.setattr(schema_version, "head_revisions", slow_heads)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(time.perf_counter() - last)
            last = time.perf_counter()

    ticker = asyncio.create_task(tick())
    try:
        probe = await service.client.get("/readyz")
    finally:
        ticker.cancel()
    assert reading.is_set()
    assert probe.json()["checks"]["database"] == "ok"
    assert max(gaps) < 0.3, f"the probe held the event loop for {max(gaps):.2f} s"


async def test_probes_during_the_first_read_of_the_scripts_read_them_once(
    service_factory: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probes that arrive while the first read of the scripts is still out wait for it
    instead of each reading them again in a thread of its own (under load, every such
    read takes seconds and competes with the event loop)."""
    import asyncio
    import time

    import alembic.script

    import app.schema_version as schema_version

    service = await build(service_factory, sqlite_url, tmp_path)
    head_revisions.cache_clear()
    schema_version.known_revisions.cache_clear()
    reads: list[str] = []

    class SlowScripts(ScriptDirectory):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            reads.append("read")
            time.sleep(0.2)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(alembic.script, "ScriptDirectory", SlowScripts)
    probes = await asyncio.gather(*(service.client.get("/readyz") for _ in range(4)))
    assert [probe.json()["checks"]["database"] for probe in probes] == ["ok"] * 4
    assert len(reads) == 2  # the heads, and every known revision: once each
