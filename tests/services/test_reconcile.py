"""The reconciler: quiet tasks are queried, lost submissions settled, nothing lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import update
from sqlmodel import col

from app.config import Settings
from app.models import Task, utcnow
from tests.conftest import Service, make_settings
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Harness:
    """The service (background loops off), its simulator, and a query counter."""

    def __init__(self, service: Service, sim: httpx.AsyncClient, queries: Counter[str]) -> None:
        self.service = service
        self.sim = sim
        self.queries = queries

    async def submit(self, prompt: str = "a fox") -> str:
        response = await self.service.client.post("/tasks", json={"prompt": prompt})
        assert response.status_code == 202, response.text
        task_id: str = response.json()["id"]
        return task_id

    async def make_due(self, task_id: str, **columns: Any) -> None:
        """Pretend the task has been quiet long enough (and set other columns)."""
        values = {"next_poll_at": utcnow() - timedelta(seconds=1), **columns}
        async with self.service.runtime.sessions() as session, session.begin():
            await session.execute(update(Task).where(col(Task.id) == task_id).values(**values))

    async def row(self, task_id: str, columns: str) -> tuple[Any, ...]:
        """Typed column values of one task (datetimes stay datetimes on SQLite)."""
        async with self.service.runtime.sessions() as session:
            task = await session.get(Task, task_id)
        assert task is not None
        return tuple(getattr(task, name.strip()) for name in columns.split(","))


@pytest_asyncio.fixture(loop_scope="session")
async def harness(service_factory: Any, settings: Settings) -> Harness:
    """Callbacks dropped by the simulator, so only the reconciler can learn outcomes."""
    transport, _ = simulator_transport(estimated_time=100, time_scale=10.0)
    queries: Counter[str] = Counter()

    class Counting(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET" and request.url.path.startswith("/v1/tasks/"):
                queries[request.url.path.rsplit("/", 1)[1]] += 1
            return await transport.handle_async_request(request)

    service: Service = await service_factory(settings, Counting())
    sim = httpx.AsyncClient(transport=transport, base_url="http://starmagic.test")
    return Harness(service, sim, queries)


async def test_a_lost_callback_is_recovered_by_querying(harness: Harness) -> None:
    """A completed task whose callback never came is completed by the reconciler."""
    task_id = await harness.submit()
    (upstream_id,) = await harness.row(task_id, "upstream_task_id")
    assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
    await harness.make_due(task_id)
    assert await harness.service.runtime.reconciler.run_once() == 1
    status, image_status, next_poll = await harness.row(
        task_id, "status, image_status, next_poll_at"
    )
    assert (status, image_status, next_poll) == ("completed", "pending", None)
    assert harness.queries[upstream_id] == 1


async def test_a_still_running_task_is_polled_again_later(harness: Harness) -> None:
    """No outcome yet: the next look is pushed out and the attempt counted."""
    task_id = await harness.submit()
    await harness.make_due(task_id)
    before = utcnow()
    await harness.service.runtime.reconciler.run_once()
    status, attempts, next_poll, lease = await harness.row(
        task_id, "status, poll_attempts, next_poll_at, poll_lease_until"
    )
    assert status in ("pending", "processing")
    assert attempts == 1
    assert next_poll > before + timedelta(seconds=100)
    assert lease is None
    assert await harness.service.runtime.reconciler.run_once() == 0


async def test_tasks_not_due_are_left_alone(harness: Harness) -> None:
    """A task that had news recently is not queried."""
    await harness.submit()
    assert await harness.service.runtime.reconciler.run_once() == 0
    assert sum(harness.queries.values()) == 0


async def test_an_unknown_submission_is_settled_after_its_deadline(harness: Harness) -> None:
    """Without a provider id nothing can be queried: wait for the deadline, then fail."""
    task_id = await harness.submit()
    created = utcnow() - timedelta(hours=2)
    await harness.make_due(task_id, status="submitting", upstream_task_id=None, created_at=created)
    await harness.service.runtime.reconciler.run_once()
    status, code = await harness.row(task_id, "status, error_code")
    assert (status, code) == ("failed", "submission_outcome_unknown")


async def test_an_unknown_submission_waits_until_its_deadline(harness: Harness) -> None:
    """Before the deadline the task is only rescheduled to it."""
    task_id = await harness.submit()
    await harness.make_due(task_id, status="submitting", upstream_task_id=None)
    await harness.service.runtime.reconciler.run_once()
    status, next_poll = await harness.row(task_id, "status, next_poll_at")
    assert status == "submitting"
    assert next_poll > utcnow() + timedelta(minutes=30)


async def test_a_task_past_any_valid_link_is_given_up(harness: Harness) -> None:
    """After 24 hours without an outcome the task fails with a clear error."""
    task_id = await harness.submit()
    await harness.make_due(task_id, created_at=utcnow() - timedelta(hours=25))
    await harness.service.runtime.reconciler.run_once()
    status, code = await harness.row(task_id, "status, error_code")
    assert (status, code) == ("failed", "no_outcome")


async def test_a_task_the_provider_does_not_know_fails_after_repeated_404s(
    harness: Harness,
) -> None:
    """Three not-found answers in a row fail the task."""
    task_id = await harness.submit()
    for _ in range(3):
        await harness.make_due(task_id, upstream_task_id="task-unified-0-unknown")
        await harness.service.runtime.reconciler.run_once()
    status, code = await harness.row(task_id, "status, error_code")
    assert (status, code) == ("failed", "upstream_not_found")


@pytest.mark.postgres
async def test_replicas_never_poll_the_same_task_at_once(
    service_factory: Any, postgres_database: str, tmp_path: Path
) -> None:
    """Two reconcilers racing over 30 due tasks query each task exactly once."""
    settings = make_settings(postgres_database, tmp_path)
    transport, _ = simulator_transport(estimated_time=100, time_scale=10.0)
    queries: Counter[str] = Counter()

    class Counting(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                queries[request.url.path] += 1
                await asyncio.sleep(0.01)  # keep the batches overlapping
            return await transport.handle_async_request(request)

    first: Service = await service_factory(settings, Counting())
    second: Service = await service_factory(settings, Counting())
    harness = Harness(first, httpx.AsyncClient(transport=transport), queries)
    ids = [await harness.submit(f"p{index}") for index in range(30)]
    for task_id in ids:
        await harness.make_due(task_id)
    polled = await asyncio.gather(
        first.runtime.reconciler.run_once(),
        second.runtime.reconciler.run_once(),
        first.runtime.reconciler.run_once(),
        second.runtime.reconciler.run_once(),
    )
    assert sum(polled) == 30
    assert len(queries) == 30
    assert set(queries.values()) == {1}
