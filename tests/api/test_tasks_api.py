"""POST/GET /tasks through the real app, with the simulator as the upstream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.config import Settings
from tests.conftest import API_TOKEN, Service
from tests.helpers import scripted_transport, simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def service(service_factory: Any, settings: Settings) -> Service:
    """The service, talking to an in-process simulator."""
    transport, _ = simulator_transport()
    built: Service = await service_factory(settings, transport)
    return built


async def test_submit_answers_202_with_location_and_records_the_provider_id(
    service: Service,
) -> None:
    """A valid request is submitted once and comes back as a pending task."""
    response = await service.client.post(
        "/tasks", json={"prompt": "a lighthouse", "size": "1:1", "metadata": {"k": "v"}}
    )
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["status"] == "pending"
    assert task["upstream_task_id"].startswith("task-unified-")
    assert task["metadata"] == {"k": "v"}
    assert response.headers["location"].endswith(f"/tasks/{task['id']}")
    shown = await service.client.get(f"/tasks/{task['id']}")
    assert shown.status_code == 200
    assert shown.json()["upstream_task_id"] == task["upstream_task_id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 6001}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "p", "size": "999x999"}, "size"),
        ({"prompt": "p", "quality": "ultra"}, "quality"),
        ({"prompt": "p", "model": "dall-e-3"}, "model"),
        ({"prompt": "p", "n": 2}, "n"),
        ({"prompt": "p", "image_urls": []}, "image_urls"),
        ({"prompt": "p", "image_urls": ["https://e.com/a.png"] * 17}, "image_urls"),
        ({"prompt": "p", "image_urls": ["http://e.com/a.png"]}, "image_urls"),
        ({"prompt": "p", "image_urls": "https://e.com/a.png"}, "image_urls"),
        ({"prompt": "p", "metadata": {"k": "v" * 5000}}, "metadata"),
        ({"prompt": "p", "metadata": ["not", "an", "object"]}, "metadata"),
        ({"prompt": "p", "colour": "red"}, "colour"),
        ({"prompt": "a\u0000b"}, "prompt"),
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"prompt": "p", "metadata": {"note": "\ud800"}}, "metadata"),
        ({"prompt": "p", "metadata": {"k\u0000": "v"}}, "metadata"),
        ({"prompt": "p", "image_urls": ["https://e.com/a\u0000.png"]}, "image_urls"),
    ],
)
async def test_invalid_requests_get_422_naming_the_field_and_send_nothing(
    service: Service, body: dict[str, Any], field: str
) -> None:
    """Everything the provider would refuse is refused first, and nothing is stored."""
    raw = json.dumps(body).encode()  # lone surrogates travel as JSON escapes
    response = await service.client.post(
        "/tasks", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0]["field"].startswith(field)
    assert error["details"][0]["reason"]
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_malformed_json_and_oversized_bodies_are_refused(service: Service) -> None:
    """Broken JSON gets 422 and a body over 1 MiB gets 413; nothing is stored."""
    broken = await service.client.post(
        "/tasks", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 422
    huge = await service.client.post("/tasks", json={"prompt": "p", "metadata": {"x": "y" * 2**20}})
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "payload_too_large"

    async def trickle() -> Any:
        for _ in range(20):
            yield b" " * 65536

    chunked = await service.client.post(
        "/tasks", content=trickle(), headers={"Content-Type": "application/json"}
    )
    assert chunked.status_code == 413
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
)
async def test_tasks_need_a_valid_bearer_token(service: Service, headers: dict[str, str]) -> None:
    """No token, a wrong one or another scheme: 401 with a Bearer challenge."""
    client = httpx.AsyncClient(transport=service.client._transport, base_url="https://t")
    async with client:
        for method, path in (("POST", "/tasks"), ("GET", "/tasks"), ("GET", "/tasks/x")):
            response = await client.request(method, path, json={"prompt": "p"}, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "unauthorized"
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


async def test_idempotency_key_replays_and_refuses_a_different_body(service: Service) -> None:
    """Same key and body: the same task; same key, other body: 422."""
    headers = {"Idempotency-Key": "order-1042"}
    first = await service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    again = await service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    other = await service.client.post("/tasks", json={"prompt": "b"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert await service.sql("SELECT count(*) FROM tasks") == [(1,)]


async def test_idempotency_keys_are_scoped_per_caller(service: Service) -> None:
    """Two callers with the same key get two tasks."""
    headers = {"Idempotency-Key": "shared"}
    mine = await service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    theirs = await service.client.post(
        "/tasks",
        json={"prompt": "a"},
        headers={**headers, "Authorization": "Bearer second-token-bbbbbbbbbbbbbbbbbb"},
    )
    assert mine.json()["id"] != theirs.json()["id"]


async def test_a_key_still_in_flight_gets_409(service_factory: Any, settings: Settings) -> None:
    """While the first submit waits on the provider, a retry with its key gets 409."""
    release = asyncio.Event()
    sim, _ = simulator_transport()

    class SlowUpstream(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await release.wait()
            return await sim.handle_async_request(request)

    service: Service = await service_factory(settings, SlowUpstream())
    headers = {"Idempotency-Key": "slow-1"}
    first = asyncio.create_task(
        service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    )
    await asyncio.sleep(0.3)
    second = await service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    release.set()
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "idempotency_in_flight"
    assert (await first).status_code == 202


async def test_provider_refusal_is_502_with_its_reason_and_the_task_failed(
    service_factory: Any, settings: Settings
) -> None:
    """A 400 from StarMagic: 502 naming its reason, the task recorded as failed."""
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        error = {"code": "content_policy", "message": "prompt refused", "type": "invalid"}
        return httpx.Response(400, json={"error": error})

    service: Service = await service_factory(settings, scripted_transport(refuse))
    response = await service.client.post("/tasks", json={"prompt": "a"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert "prompt refused" in error["message"]
    task_id = error["details"][0]["task_id"]
    task = (await service.client.get(f"/tasks/{task_id}")).json()
    assert task["status"] == "failed"
    assert task["error"] == {
        "code": "content_policy",
        "message": "prompt refused",
        "retryable": None,
    }
    assert len(calls) == 1


async def test_provider_outage_is_503_after_bounded_retries(
    service_factory: Any, settings: Settings
) -> None:
    """429/503 are retried a bounded number of times, then 503 with the task failed."""
    calls: list[httpx.Request] = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, headers={"Retry-After": "0"}, json={"message": "maintenance"})

    service: Service = await service_factory(settings, scripted_transport(busy))
    response = await service.client.post("/tasks", json={"prompt": "a"})
    assert response.status_code == 503
    assert "maintenance" in response.json()["error"]["message"]
    assert len(calls) == 3
    rows = await service.sql("SELECT status FROM tasks")
    assert rows == [("failed",)]


async def test_read_timeout_never_resends_and_leaves_the_outcome_unknown(
    service_factory: Any, settings: Settings
) -> None:
    """After a read timeout the submit is not sent again; the task says so."""
    calls: list[httpx.Request] = []

    def lost(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("no answer", request=request)

    service: Service = await service_factory(settings, scripted_transport(lost))
    response = await service.client.post("/tasks", json={"prompt": "a"})
    assert response.status_code == 202
    assert response.json()["status"] == "submitting"
    assert len(calls) == 1
    rows = await service.sql("SELECT submit_outcome_unknown FROM tasks")
    assert [bool(row[0]) for row in rows] == [True]


async def test_connect_errors_are_retried_because_nothing_was_sent(
    service_factory: Any, settings: Settings
) -> None:
    """A refused connection is tried again; the second attempt goes through."""
    sim, _ = simulator_transport()
    attempts: list[str] = []

    class FlakyConnect(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            attempts.append(request.url.path)
            if len(attempts) == 1:
                raise httpx.ConnectError("connection refused", request=request)
            return await sim.handle_async_request(request)

    service: Service = await service_factory(settings, FlakyConnect())
    response = await service.client.post("/tasks", json={"prompt": "a"})
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    assert len(attempts) == 2


async def test_list_is_newest_first_with_filters_and_a_cursor(service: Service) -> None:
    """Keyset pages cover every task once, newest first; filters narrow them."""
    ids = []
    for index in range(7):
        response = await service.client.post("/tasks", json={"prompt": f"p{index}"})
        ids.append(response.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await service.client.get("/tasks", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    pending = (await service.client.get("/tasks", params={"status": "pending"})).json()
    assert len(pending["items"]) == 7
    failed = (await service.client.get("/tasks", params={"status": "failed"})).json()
    assert failed == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"status": "done"},
        {"image_status": "x"},
        {"cursor": "not-a-cursor"},
        {"created_after": "yesterday"},
    ],
)
async def test_list_refuses_bad_parameters(service: Service, params: dict[str, Any]) -> None:
    """Bad filters and cursors get 422 with the field."""
    response = await service.client.get("/tasks", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] in {
        *params,
        "query." + next(iter(params)),
    }


@pytest.mark.parametrize(
    "path", ["/tasks/tsk_nope", "/tasks/a%00b", "/tasks/" + "x" * 5000, "/tasks/%FF%FE/image"]
)
async def test_unknown_or_impossible_task_ids_are_404(service: Service, path: str) -> None:
    """A task id that does not (or could not) exist is 404 in the one error shape."""
    response = await service.client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_openapi_documents_the_routes_with_examples(service: Service, tmp_path: Path) -> None:
    """The OpenAPI schema lists every public route and the request example."""
    schema = (await service.client.get("/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}", "/tasks/{task_id}/image", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    create = schema["components"]["schemas"]["TaskCreate"]
    assert create["examples"][0]["prompt"]
    assert API_TOKEN not in str(schema)
