"""The provider's published API through our routes: usage, several images,
cancellation, and submit answers that do or do not mean "nothing was created"."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from app.config import Settings
from tests.conftest import Service, make_settings
from tests.factories import make_image, make_task
from tests.helpers import scripted_transport, task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")

UPSTREAM_ID = "task-unified-1757156493-imcg5zqt"
SUBMITTED = {
    "created": 1757156493,
    "id": UPSTREAM_ID,
    "model": "gpt-image-2",
    "object": "image.generation.task",
    "progress": 0,
    "status": "pending",
    "task_info": {"can_cancel": True, "estimated_time": 100},
    "type": "image",
    "usage": {"billing_rule": "per_call", "credits_reserved": 2.5, "user_group": "default"},
}


class Provider:
    """A scripted provider: answers by method, records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.submit = httpx.Response(200, json=SUBMITTED)
        self.cancel = httpx.Response(
            200, json={"id": UPSTREAM_ID, "object": "task.cancelled", "status": "cancelled"}
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "DELETE":
            return self.cancel
        if request.method == "POST":
            return self.submit
        return httpx.Response(404, json={"error": {"code": "task_not_found"}})

    def methods(self) -> list[str]:
        return [request.method for request in self.requests]


async def build(service_factory: Any, settings: Settings, provider: Provider) -> Service:
    built: Service = await service_factory(settings, scripted_transport(provider))
    return built


async def test_usage_and_can_cancel_from_the_submit_answer_are_on_the_task(
    service_factory: Any, settings: Settings
) -> None:
    """What the provider says about billing is kept and shown."""
    service = await build(service_factory, settings, Provider())
    created = await service.client.post(
        "/tasks", json={"prompt": "p", "model": "gpt-image-2", "n": 3}
    )
    assert created.status_code == 202, created.text
    shown = (await service.client.get(f"/tasks/{created.json()['id']}")).json()
    assert shown["usage"] == SUBMITTED["usage"]
    assert (shown["can_cancel"], shown["n"], shown["model"]) == (True, 3, "gpt-image-2")
    sent = json.loads(service_requests_body(service, 0))
    assert (sent["model"], sent["n"]) == ("gpt-image-2", 3)


def service_requests_body(service: Service, index: int) -> bytes:
    provider = service.runtime.http._transport.handler  # type: ignore[attr-defined]
    body: bytes = provider.requests[index].content
    return body


async def test_a_model_not_enabled_is_refused_before_sending(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """ALLOWED_MODELS narrows what callers may ask for: 422 naming the field, nothing sent."""
    provider = Provider()
    settings = make_settings(database_url, tmp_path, allowed_models="gpt-image-1.5")
    service = await build(service_factory, settings, provider)
    refused = await service.client.post("/tasks", json={"prompt": "p", "model": "gpt-image-2"})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["field"] == "model"
    assert provider.requests == []
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_each_image_is_served_at_its_index(
    service_factory: Any, settings: Settings, tmp_path: Path
) -> None:
    """Several stored images: `images` lists each, `image` is the first, bytes by index."""
    service = await build(service_factory, settings, Provider())
    bodies = [b"\x89PNG\r\n\x1a\n" + bytes([n]) * 100 for n in range(3)]
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed", n=3, image_status="stored")
        for position, body in enumerate(bodies):
            key = f"{task.created_at:%Y/%m/%d}/{task.id}-{position}.png"
            source = tmp_path / f"{position}.png"
            source.write_bytes(body)
            digest = hashlib.sha256(body).hexdigest()
            await service.runtime.storage.put_file(
                key, source, content_type="image/png", sha256=digest
            )
            await make_image(
                session,
                task.id,
                position,
                status="stored",
                key=key,
                sha256=digest,
                content_type="image/png",
                size_bytes=len(body),
            )
    shown = (await service.client.get(f"/tasks/{task.id}")).json()
    assert [image["index"] for image in shown["images"]] == [0, 1, 2]
    assert shown["image"] == shown["images"][0]
    assert shown["images"][2]["url"].endswith(f"/tasks/{task.id}/images/2")
    for position, body in enumerate(bodies):
        fetched = await service.client.get(f"/tasks/{task.id}/images/{position}")
        assert fetched.status_code == 200
        assert fetched.content == body
        assert fetched.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert (await service.client.get(f"/tasks/{task.id}/image")).content == bodies[0]
    missing = await service.client.get(f"/tasks/{task.id}/images/3")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "no_such_image")
    assert (await service.client.get(f"/tasks/{task.id}/images/-1")).status_code == 422


async def test_cancel_applies_the_providers_confirmation(
    service_factory: Any, settings: Settings
) -> None:
    """The provider answers `cancelled`: the task is cancelled, says why, and the move
    is logged."""
    provider = Provider()
    service = await build(service_factory, settings, provider)
    task = (await service.client.post("/tasks", json={"prompt": "p"})).json()
    with capture_logs() as logs:
        response = await service.client.post(f"/tasks/{task['id']}/cancel")
    moves = [
        (line["task_id"], line["status"]) for line in logs if line["event"] == "task_transition"
    ]
    assert moves == [(task["id"], "cancelled")]
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["error"]["retryable"] is False
    assert provider.methods() == ["POST", "DELETE"]
    assert provider.requests[1].url.path == f"/v1/tasks/{UPSTREAM_ID}"
    again = await service.client.post(f"/tasks/{task['id']}/cancel")
    assert (again.status_code, again.json()["error"]["code"]) == (409, "not_cancellable")
    assert provider.methods() == ["POST", "DELETE"]


@pytest.mark.parametrize("status", [404, 405])
async def test_a_provider_without_cancel_gets_501_and_nothing_changes(
    service_factory: Any, settings: Settings, status: int
) -> None:
    """404/405 from the provider: 501 cancel_not_supported, the task untouched."""
    provider = Provider()
    provider.cancel = httpx.Response(status, json={"error": {"code": "not_found"}})
    service = await build(service_factory, settings, provider)
    task = (await service.client.post("/tasks", json={"prompt": "p"})).json()
    response = await service.client.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 501
    assert response.json()["error"]["code"] == "cancel_not_supported"
    after = (await service.client.get(f"/tasks/{task['id']}")).json()
    assert (after["status"], after["error"]) == ("pending", None)


async def test_cancel_is_refused_when_the_provider_says_it_cannot(
    service_factory: Any, settings: Settings
) -> None:
    """`can_cancel: false` or a 400 from the provider: 409, the task untouched."""
    provider = Provider()
    provider.cancel = httpx.Response(400, json={"error": {"message": "already running"}})
    service = await build(service_factory, settings, provider)
    task = (await service.client.post("/tasks", json={"prompt": "p"})).json()
    refused = await service.client.post(f"/tasks/{task['id']}/cancel")
    assert refused.status_code == 409
    assert "already running" in refused.json()["error"]["message"]
    async with service.runtime.engine.begin() as db:
        await db.execute(
            text("UPDATE tasks SET can_cancel = false WHERE id = :id"), {"id": task["id"]}
        )
    before = len(provider.requests)
    assert (await service.client.post(f"/tasks/{task['id']}/cancel")).status_code == 409
    assert len(provider.requests) == before
    assert (await service.client.get(f"/tasks/{task['id']}")).json()["status"] == "pending"


async def test_a_provider_answer_other_than_cancelled_is_applied_as_news(
    service_factory: Any, settings: Settings
) -> None:
    """Cancelled only when the provider says so: a `processing` answer moves it there."""
    provider = Provider()
    provider.cancel = httpx.Response(200, json=task_body("processing", progress=40, published=True))
    service = await build(service_factory, settings, provider)
    task = (await service.client.post("/tasks", json={"prompt": "p"})).json()
    response = await service.client.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["progress"]) == ("processing", 40)


async def test_a_500_from_submit_is_an_unknown_outcome_not_a_refusal(
    service_factory: Any, settings: Settings
) -> None:
    """The provider may have created the task: stay submitting, never re-send."""
    provider = Provider()
    provider.submit = httpx.Response(500, json={"error": {"code": "internal_error"}})
    service = await build(service_factory, settings, provider)
    response = await service.client.post(
        "/tasks", json={"prompt": "p"}, headers={"Idempotency-Key": "k-500"}
    )
    assert response.status_code == 202
    assert response.json()["status"] == "submitting"
    replay = await service.client.post(
        "/tasks", json={"prompt": "p"}, headers={"Idempotency-Key": "k-500"}
    )
    assert replay.json()["id"] == response.json()["id"]
    assert provider.methods() == ["POST"]


async def test_retrying_after_a_503_with_the_same_key_submits(
    service_factory: Any, settings: Settings
) -> None:
    """Nothing was created on a 503, so the key is released: the retry reaches the provider."""
    provider = Provider()
    provider.submit = httpx.Response(503, headers={"Retry-After": "30"})
    service = await build(service_factory, settings, provider)
    headers = {"Idempotency-Key": "k-503"}
    first = await service.client.post("/tasks", json={"prompt": "p"}, headers=headers)
    assert first.status_code == 503
    attempts = len(provider.requests)
    provider.submit = httpx.Response(200, json=SUBMITTED)
    retry = await service.client.post("/tasks", json={"prompt": "p"}, headers=headers)
    assert retry.status_code == 202, retry.text
    assert "idempotent-replayed" not in retry.headers
    assert retry.json()["status"] == "pending"
    assert len(provider.requests) == attempts + 1
    replay = await service.client.post("/tasks", json={"prompt": "p"}, headers=headers)
    assert replay.json()["id"] == retry.json()["id"]
    assert len(provider.requests) == attempts + 1


async def test_a_refusal_keeps_the_key_bound_to_the_failed_task(
    service_factory: Any, settings: Settings
) -> None:
    """A 400 is the provider's final word on that body: the same key replays the failure."""
    provider = Provider()
    provider.submit = httpx.Response(400, json={"error": {"code": "invalid_parameters"}})
    service = await build(service_factory, settings, provider)
    headers = {"Idempotency-Key": "k-400"}
    first = await service.client.post("/tasks", json={"prompt": "p"}, headers=headers)
    assert first.status_code == 502
    replay = await service.client.post("/tasks", json={"prompt": "p"}, headers=headers)
    assert replay.status_code == 202
    assert replay.json()["status"] == "failed"
    assert replay.json()["error"]["retryable"] is False
    assert provider.methods() == ["POST"]


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, "invalid_parameters", False),
        (401, "unauthorized", True),
        (402, "quota_exceeded", True),
        (403, "permission_denied", True),
    ],
)
async def test_a_submit_refusal_without_a_code_keeps_the_published_code_of_its_status(
    service_factory: Any, settings: Settings, status: int, code: str, retryable: bool
) -> None:
    """A refusal whose body names no code: the task keeps the code published for its status."""
    provider = Provider()
    provider.submit = httpx.Response(status, json={"error": {"message": "refused"}})
    service = await build(service_factory, settings, provider)
    response = await service.client.post("/tasks", json={"prompt": "p"})
    assert response.status_code == 502
    assert response.json()["error"]["details"][0]["provider_code"] == code
    task_id = response.json()["error"]["details"][0]["task_id"]
    shown = (await service.client.get(f"/tasks/{task_id}")).json()
    assert shown["error"] == {"code": code, "message": "refused", "retryable": retryable}
    assert provider.methods() == ["POST"]


async def test_a_429_passes_the_providers_retry_after_to_the_caller(
    service_factory: Any, settings: Settings
) -> None:
    """Rate limited for two minutes: 503 with Retry-After 120, the task failed as retryable."""
    provider = Provider()
    provider.submit = httpx.Response(429, headers={"Retry-After": "120"})
    service = await build(service_factory, settings, provider)
    response = await service.client.post("/tasks", json={"prompt": "p"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "120"
    task_id = response.json()["error"]["details"][0]["task_id"]
    shown = (await service.client.get(f"/tasks/{task_id}")).json()
    assert (shown["error"]["code"], shown["error"]["retryable"]) == ("rate_limit_exceeded", True)
    assert provider.methods() == ["POST"]
