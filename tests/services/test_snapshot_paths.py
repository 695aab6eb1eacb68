"""Every path that parses a provider task reads every shape: the reconciler's poll
and the confirmation of a callback (the webhook and link renewal have their own
tests in tests/api/test_webhooks.py and tests/services/test_downloads.py)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.callback_urls import sign
from app.config import Settings
from app.models import utcnow
from tests.conftest import WEBHOOK_SECRET, Service
from tests.factories import make_task
from tests.helpers import scripted_transport, task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The published shape, the enveloped one (its link a string or a list) and its bare data.
SHAPES = ["published", "envelope", "envelope-url-list", "bare"]
LINKS = ["https://cdn.example.com/first.png", "https://cdn.example.com/second.png"]


def completed(shape: str, upstream_id: str) -> dict[str, Any]:
    """A realistic completed task with two images, in one of the shapes."""
    body = task_body(
        "completed",
        upstream_id=upstream_id,
        urls=LINKS,
        envelope=shape.startswith("envelope"),
        published=shape == "published",
    )
    if shape == "envelope-url-list":
        for image in body["data"]["result"]["images"]:
            image["url"] = [image["url"]]
    return body


class QueryAPI:
    """The provider's query API answering one body; counts the queries."""

    def __init__(self) -> None:
        self.body: dict[str, Any] = {}
        self.queries = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.queries += 1
        return httpx.Response(200, json=self.body)


async def image_links(service: Service, task_id: str) -> list[tuple[int, str]]:
    rows = await service.sql(
        "SELECT position, source_url FROM images WHERE task_id = :id ORDER BY position",
        id=task_id,
    )
    return [(position, url) for position, url in rows]


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_reconciler_applies_every_shape(
    service_factory: Any, settings: Settings, shape: str
) -> None:
    """A due poll answered in any shape completes the task and queues each image."""
    api = QueryAPI()
    service: Service = await service_factory(settings, scripted_transport(api))
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="processing", next_poll_at=utcnow(), n=len(LINKS))
    api.body = completed(shape, task.upstream_task_id or "")
    assert await service.runtime.reconciler.run_once() == 1
    assert api.queries == 1
    assert (await service.client.get(f"/tasks/{task.id}")).json()["status"] == "completed"
    assert await image_links(service, task.id) == list(enumerate(LINKS))


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_callback_is_confirmed_in_every_shape(
    service_factory: Any, settings: Settings, shape: str
) -> None:
    """A terminal callback in any shape is confirmed by a query answered in the same shape."""
    api = QueryAPI()
    service: Service = await service_factory(settings, scripted_transport(api))
    async with service.runtime.sessions() as session:
        later = utcnow() + timedelta(hours=1)
        task = await make_task(session, status="pending", next_poll_at=later, n=len(LINKS))
    api.body = completed(shape, task.upstream_task_id or "")
    hook = f"/webhooks/starmagic/{task.id}/{sign(task.id, WEBHOOK_SECRET)}"
    answer = await service.client.post(hook, content=json.dumps(api.body))
    assert answer.json()["outcome"] == "confirming"
    for _ in range(200):
        if (await service.client.get(f"/tasks/{task.id}")).json()["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    assert api.queries == 1
    assert await image_links(service, task.id) == list(enumerate(LINKS))
