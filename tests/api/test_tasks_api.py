"""POST/GET /tasks through the real app, with the simulator as the upstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app import repository
from app.config import Settings
from app.models import utcnow
from app.schemas import TaskCreate
from app.services.tasks import fingerprint
from tests.conftest import API_TOKEN, Service
from tests.factories import make_image, make_task
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
        ({"prompt": "p", "model": "gpt-image-2-beta", "quality": "high"}, "quality"),
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
    reached = asyncio.Event()
    release = asyncio.Event()
    sim, _ = simulator_transport()

    class SlowUpstream(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            reached.set()  # the first request owns its key and waits on the provider
            await release.wait()
            return await sim.handle_async_request(request)

    service: Service = await service_factory(settings, SlowUpstream())
    headers = {"Idempotency-Key": "slow-1"}
    first = asyncio.create_task(
        service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    )
    await asyncio.wait_for(reached.wait(), timeout=60)
    second = await service.client.post("/tasks", json={"prompt": "a"}, headers=headers)
    release.set()
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "idempotency_in_flight"
    assert "still in flight" in second.json()["error"]["message"]
    assert second.headers["retry-after"] == "1"
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
    assert error["details"][0]["provider_status"] == 400
    assert error["details"][0]["provider_code"] is not None
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
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert "maintenance" in error["message"]
    (detail,) = error["details"]
    assert detail["provider_status"] == 503
    assert detail["task_id"].startswith("tsk_")
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


async def test_tasks_created_in_the_same_instant_page_once_each_in_order(
    service: Service,
) -> None:
    """Six tasks sharing one created_at, two a page: each exactly once, newest id first."""
    instant = utcnow() - timedelta(minutes=5)
    async with service.runtime.sessions() as session:
        ids = [(await make_task(session, created_at=instant)).id for _ in range(6)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):  # bounded: a cursor that loops fails the test instead of hanging
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await service.client.get("/tasks", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)


async def test_a_listed_task_is_byte_for_byte_its_own_representation(service: Service) -> None:
    """Every field, set or not, reads the same in a page as from GET /tasks/{id}: a
    completed task with three images (stored, failed, pending) and every optional field
    set, a failed task with its error, and a bare pending one."""
    now = utcnow().replace(microsecond=123456)
    async with service.runtime.sessions() as session:
        full = await make_task(
            session,
            status="completed",
            progress=100,
            prompt="Un phare à l'aube, « aquarelle » 🌅",
            model="gpt-image-2",
            size="3:2",
            quality="high",
            resolution="2k",
            n=3,
            image_urls=["https://example.com/a.png", "https://example.com/b.png"],
            mask_url="https://example.com/mask.png",
            meta={"order": "A-1", "nested": {"list": [1, 2.5, None, True]}, "ü": "ß"},
            can_cancel=False,
            usage={"billing_rule": "per_call", "credits_reserved": 2.5},
            created_at=now - timedelta(minutes=3),
            completed_at=now - timedelta(minutes=2),
            image_status="failed",
        )
        await make_image(
            session,
            full.id,
            0,
            status="stored",
            content_type="image/png",
            size_bytes=1843221,
            sha256="ab" * 32,
            width=1024,
            height=1536,
            stored_at=now - timedelta(minutes=1),
        )
        await make_image(
            session, full.id, 1, status="failed", error_code="too_large", error_message="big"
        )
        await make_image(session, full.id, 2)
        failed = await make_task(
            session,
            status="failed",
            error_code="content_policy_violation",
            error_message="the prompt was refused",
            created_at=now - timedelta(minutes=2),
            completed_at=now - timedelta(minutes=1),
        )
        bare = await make_task(
            session, created_at=now - timedelta(minutes=1), upstream_task_id=None
        )

    listing = await service.client.get("/tasks", params={"limit": 3})
    assert listing.status_code == 200
    items = listing.json()["items"]
    assert [item["id"] for item in items] == [bare.id, failed.id, full.id]
    for item in items:
        one = await service.client.get(f"/tasks/{item['id']}")
        assert item == one.json()
        assert one.content in listing.content  # the same bytes, not just equal values
    shown = items[2]
    unset = {name for name, value in shown.items() if value is None}
    assert unset == {"error"}, f"the full task shows no {sorted(unset)}"  # completed: no error
    assert shown["metadata"] == full.meta
    assert shown["usage"] == full.usage
    assert [image["status"] for image in shown["images"]] == ["stored", "failed", "pending"]
    assert shown["images"][0]["url"].endswith(f"/tasks/{full.id}/image")
    assert shown["images"][1]["error"] == {"code": "too_large", "message": "big", "retryable": None}
    assert items[1]["error"]["code"] == "content_policy_violation"
    assert items[1]["settled"] is True
    assert shown["settled"] is False


async def test_next_cursor_names_the_last_task_of_the_page(service: Service) -> None:
    """The cursor is base64url (unpadded) JSON of the last item's created_at and id."""
    instant = utcnow().replace(microsecond=654321) - timedelta(minutes=5)
    async with service.runtime.sessions() as session:
        for offset in range(3):
            await make_task(session, created_at=instant + timedelta(seconds=offset))
    page = (await service.client.get("/tasks", params={"limit": 2})).json()
    last = page["items"][-1]
    raw = base64.urlsafe_b64decode(page["next_cursor"] + "=" * (-len(page["next_cursor"]) % 4))
    assert "=" not in page["next_cursor"]
    second = instant + timedelta(seconds=1)
    assert last["created_at"].startswith(second.strftime("%Y-%m-%dT%H:%M:%S.654321"))
    assert raw == json.dumps([second.isoformat(), last["id"]]).encode()


async def test_a_listing_answers_while_a_writer_holds_its_transaction(service: Service) -> None:
    """A page is one statement outside any transaction: it neither waits for a writer
    (SQLite's write lock) nor sees what the writer has not committed."""
    async with service.runtime.sessions() as session:
        task = await make_task(session, prompt="before")
    async with service.runtime.engine.begin() as writer:
        await writer.execute(
            repository.TASKS.update()
            .where(repository.TASKS.c.id == task.id)
            .values(prompt="uncommitted")
        )
        response = await service.client.get("/tasks", timeout=3)
        assert response.status_code == 200
        assert [item["prompt"] for item in response.json()["items"]] == ["before"]
        await writer.rollback()


def _cursor_of(created_at: str, task_id: str = "tsk_01M8MV92R2FCEA6NW537R5XQK3") -> str:
    """A cursor as the service encodes one, for an instant of our choosing."""
    raw = json.dumps([created_at, task_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_a_page_never_shows_part_of_a_commit_that_moves_a_task_and_its_images(
    service: Service,
) -> None:
    """A writer flips a task between completed with three images and pending with none,
    each flip one transaction, while pages are read: a page shows the task and its
    images as of one commit (the page and its images are one statement)."""
    tasks, images = repository.TASKS, repository.metadata.tables["images"]
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="pending")
    done = asyncio.Event()

    async def flip() -> int:
        flips = 0
        while not done.is_set():
            completed = flips % 2 == 0
            async with service.runtime.engine.begin() as db:
                status = "completed" if completed else "pending"
                await db.execute(tasks.update().where(tasks.c.id == task.id).values(status=status))
                await db.execute(images.delete().where(images.c.task_id == task.id))
                for position in range(3 if completed else 0):
                    now = utcnow()
                    await db.execute(
                        images.insert().values(
                            task_id=task.id,
                            position=position,
                            status="pending",
                            source_url="https://cdn.example.com/x.png",
                            source_expires_at=now,
                            next_attempt_at=now,
                            created_at=now,
                            updated_at=now,
                        )
                    )
            flips += 1
            await asyncio.sleep(0)
        return flips

    async def read_pages() -> set[tuple[str, int]]:
        seen = set()
        for _ in range(100):
            page = await service.client.get("/tasks")
            assert page.status_code == 200, page.text
            seen |= {(item["status"], len(item["images"])) for item in page.json()["items"]}
        return seen

    writer = asyncio.create_task(flip())
    try:
        seen = await asyncio.gather(read_pages(), read_pages())
    finally:
        done.set()
        flips = await writer
    assert flips > 2
    assert set().union(*seen) <= {("completed", 3), ("pending", 0)}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"status": "done"},
        {"image_status": "x"},
        {"cursor": "not-a-cursor"},
        {"created_after": "yesterday"},
        # Instants whose offset carries them past year 1 or 9999 once in UTC.
        {"cursor": _cursor_of("0001-01-01T00:00:00+01:00")},
        {"cursor": _cursor_of("9999-12-31T23:59:59-01:00")},
        {"created_after": "0001-01-01T00:00:00+01:00"},
        {"created_before": "9999-12-31T23:59:59-01:00"},
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
    """The OpenAPI schema lists every public route and a valid request example per model."""
    schema = (await service.client.get("/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}", "/tasks/{task_id}/image", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    create = schema["components"]["schemas"]["TaskCreate"]
    examples = [TaskCreate.model_validate(example) for example in create["examples"]]
    assert [example.model for example in examples] == list(create["properties"]["model"]["enum"])
    assert {"/events", "/events/stream", "/tasks/{task_id}/events"} <= set(schema["paths"])
    events = schema["paths"]["/events"]["get"]["responses"]["200"]["content"]
    assert events["application/json"]["schema"]["$ref"].endswith("/EventPage")
    assert schema["components"]["schemas"]["EventPage"]["examples"][0]["items"][0]["id"]
    assert schema["components"]["schemas"]["EventPublic"]["examples"][0]["type"]
    stream = schema["paths"]["/events/stream"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream
    waiting = schema["paths"]["/tasks/{task_id}"]["get"]["parameters"]
    assert "prefer" in {parameter["name"] for parameter in waiting}
    assert API_TOKEN not in str(schema)


class RecordingUpstream:
    """A provider double that accepts every submit and keeps the bodies it got."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        return httpx.Response(
            200,
            json={
                "id": f"task-unified-1757156493-rec{len(self.bodies):05d}",
                "object": "image.generation.task",
                "model": body.get("model"),
                "status": "pending",
                "progress": 0,
                "created": 1757156493,
                "task_info": {"can_cancel": True, "estimated_time": 100},
            },
        )


@pytest_asyncio.fixture(loop_scope="session")
async def recorded(service_factory: Any, settings: Settings) -> tuple[Service, RecordingUpstream]:
    """The service in front of a provider double that records each submit body."""
    upstream = RecordingUpstream()
    built: Service = await service_factory(settings, scripted_transport(upstream))
    return built, upstream


REF = "https://images.example.com/ref.png"
MASK = "https://images.example.com/mask.png"


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        pytest.param(
            {"prompt": "p", "size": "1024x1536", "quality": "low", "image_urls": [REF]},
            {
                "model": "gpt-image-1.5",
                "prompt": "p",
                "n": 1,
                "size": "1024x1536",
                "quality": "low",
                "image_urls": [REF],
            },
            id="gpt-image-1.5",
        ),
        pytest.param(
            {
                "model": "gpt-image-2",
                "prompt": "p",
                "size": "16:9",
                "resolution": "4k",
                "quality": "high",
                "n": 10,
                "image_urls": [REF],
                "mask_url": MASK,
            },
            {
                "model": "gpt-image-2",
                "prompt": "p",
                "n": 10,
                "size": "16:9",
                "resolution": "4K",
                "quality": "high",
                "image_urls": [REF],
                "mask_url": MASK,
            },
            id="gpt-image-2-ratio-mask",
        ),
        pytest.param(
            {"model": "gpt-image-2", "prompt": "界" * 32_000, "size": "3840\u00d72160"},
            {"model": "gpt-image-2", "prompt": "界" * 32_000, "n": 1, "size": "3840\u00d72160"},
            id="gpt-image-2-pixels",
        ),
        pytest.param(
            {"model": "gpt-image-2-beta", "prompt": "p", "size": "21:9", "resolution": "1k"},
            {"model": "gpt-image-2-beta", "prompt": "p", "size": "21:9", "resolution": "1K"},
            id="gpt-image-2-beta",
        ),
    ],
)
async def test_each_model_accepts_its_rules_and_sends_exactly_its_fields(
    recorded: tuple[Service, RecordingUpstream], body: dict[str, Any], sent: dict[str, Any]
) -> None:
    """A valid body per model is submitted once, with only the fields that model takes."""
    service, upstream = recorded
    response = await service.client.post("/tasks", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["model"] == sent["model"]
    assert len(upstream.bodies) == 1
    callback = upstream.bodies[0].pop("callback_url")
    assert callback.startswith("https://imagetasks.test/base/webhooks/starmagic/")
    assert upstream.bodies[0] == sent
    assert await service.sql("SELECT model FROM tasks") == [(sent["model"],)]


DEEPER_THAN_ALLOWED = {"a": {"b": {"c": {"d": {}}}}}


@pytest.mark.parametrize(
    ("body", "details"),
    [
        pytest.param(
            {"prompt": "p", "size": "auto", "resolution": "1K", "n": 2, "mask_url": MASK},
            [
                (
                    "size",
                    "must be 1:1, 2:3, 3:2, 1024x1024, 1024x1536 or 1536x1024 for gpt-image-1.5",
                ),
                ("resolution", "is not offered by gpt-image-1.5"),
                ("n", "must be 1 for gpt-image-1.5"),
                ("mask_url", "is not offered by gpt-image-1.5"),
            ],
            id="gpt-image-1.5",
        ),
        pytest.param(
            {"prompt": "x" * 6001, "quality": "High"},
            [
                ("prompt", "is too long: at most 6000 UTF-8 bytes"),
                ("quality", "must be low, medium or high"),
            ],
            id="gpt-image-1.5-prompt",
        ),
        pytest.param(
            {
                "model": "gpt-image-2",
                "prompt": "p",
                "size": "1000x5000",
                "resolution": "8k",
                "n": 11,
                "mask_url": "http://images.example.com/mask.png",
            },
            [
                ("size", "width 1000 is not a multiple of 16"),
                ("size", "height 5000 is outside 16 to 3840"),
                ("size", "height 5000 is not a multiple of 16"),
                ("size", "1000x5000 has a long:short side ratio over 3:1"),
                ("resolution", "must be 1K, 2K or 4K for gpt-image-2"),
                ("n", "must be from 1 to 10 for gpt-image-2"),
                ("mask_url", "must be an https:// URL: 'http://images.example.com/mask.png'"),
                ("mask_url", "needs image_urls: it masks a reference image"),
            ],
            id="gpt-image-2",
        ),
        pytest.param(
            {"model": "gpt-image-2", "prompt": "p", "size": "1024x624", "n": 0},
            [
                ("size", "1024x624 is 638,976 pixels, fewer than 655,360"),
                ("n", "must be from 1 to 10 for gpt-image-2"),
            ],
            id="gpt-image-2-pixels",
        ),
        pytest.param(
            {
                "model": "gpt-image-2-beta",
                "prompt": "x" * 2001,
                "size": "1024x1024",
                "resolution": "2K",
                "quality": "high",
                "n": 2,
                "image_urls": [REF],
                "mask_url": MASK,
            },
            [
                ("prompt", "is too long: at most 2000 characters"),
                (
                    "size",
                    "gpt-image-2-beta takes no explicit WxH size; use auto, 1:1, 3:2, "
                    "2:3, 4:3, 3:4, 5:4, 4:5, 16:9, 9:16, 21:9 or 9:21",
                ),
                ("resolution", "must be 1K for gpt-image-2-beta"),
                ("quality", "is not offered by gpt-image-2-beta"),
                ("n", "must be 1 for gpt-image-2-beta"),
                ("mask_url", "is not offered by gpt-image-2-beta"),
            ],
            id="gpt-image-2-beta",
        ),
        pytest.param(
            {
                "model": "gpt-image-2-beta",
                "prompt": "   ",
                "size": "2:1",
                "image_urls": ["https://e.com/a.png", "http://e.com/b.png"],
                "metadata": DEEPER_THAN_ALLOWED,
            },
            [
                ("prompt", "must not be blank"),
                (
                    "metadata",
                    "is nested too deeply at a.b.c.d: at most 4 levels of objects and arrays",
                ),
                (
                    "size",
                    "must be auto, 1:1, 3:2, 2:3, 4:3, 3:4, 5:4, 4:5, 16:9, 9:16, 21:9 "
                    "or 9:21 for gpt-image-2-beta",
                ),
                ("image_urls[1]", "must be an https:// URL: 'http://e.com/b.png'"),
            ],
            id="field-errors-beside-rule-breaches",
        ),
        pytest.param(
            {"model": "gpt-image-2", "prompt": "p", "n": "2", "quality": "best"},
            [("n", "Input should be a valid integer"), ("quality", "must be low, medium or high")],
            id="wrong-type-beside-rule-breach",
        ),
        pytest.param(
            {"model": "gpt-image-2", "prompt": "p", "image_urls": REF, "mask_url": MASK},
            [("image_urls", "Input should be a valid list")],
            id="mask-not-judged-without-valid-references",
        ),
        pytest.param(
            {"model": "gpt-image-3", "prompt": "p", "quality": "ultra"},
            [("model", "must be one of gpt-image-1.5, gpt-image-2, gpt-image-2-beta")],
            id="unknown-model",
        ),
    ],
)
async def test_broken_model_rules_get_422_listing_every_field_and_nothing_is_sent(
    recorded: tuple[Service, RecordingUpstream],
    body: dict[str, Any],
    details: list[tuple[str, str]],
) -> None:
    """Every broken rule is listed with its field and reason; nothing is stored or sent."""
    service, upstream = recorded
    response = await service.client.post("/tasks", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [(item["field"], item["reason"]) for item in error["details"]] == details
    assert upstream.bodies == []
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize("depth", [256, 900])
async def test_deeply_nested_metadata_is_422_not_a_500_while_fingerprinting(
    recorded: tuple[Service, RecordingUpstream], depth: int
) -> None:
    """Metadata hundreds of levels deep is refused at validation, naming where it is too deep."""
    service, upstream = recorded
    metadata = "[" * depth + "1" + "]" * depth  # 256 levels: under 600 bytes in all
    content = '{"prompt": "p", "metadata": {"k": ' + metadata + "}}"
    response = await service.client.post(
        "/tasks",
        content=content.encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": "deep"},
    )
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert detail == {
        "field": "metadata",
        "reason": "is nested too deeply at k[0][0][0]: at most 4 levels of objects and arrays",
    }
    assert upstream.bodies == []
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]
    assert await service.sql("SELECT count(*) FROM idempotency_records") == [(0,)]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(
            '{"a": [{"b": {"c": []}}]}',
            "is nested too deeply at a[0].b.c: at most 4 levels of objects and arrays",
            id="five-levels",
        ),
        pytest.param('{"a": [1, NaN]}', "at a[1]: numbers must be finite", id="nan"),
        pytest.param('{"a": {"b": -Infinity}}', "at a.b: numbers must be finite", id="infinity"),
        pytest.param(
            '{"a": {"b\\u0000": 1}}', "at a: a key must not contain NUL characters", id="nul-key"
        ),
        pytest.param(
            '{"k": "' + "v" * 4089 + '"}',
            "is too large: at most 4096 bytes as JSON",
            id="one-byte-over-4-KiB",
        ),
    ],
)
async def test_metadata_shape_and_size_are_bounded(
    recorded: tuple[Service, RecordingUpstream], raw: str, reason: str
) -> None:
    """Too deep, non-finite numbers, bad keys or over 4 KiB: 422 naming metadata and where."""
    service, upstream = recorded
    content = '{"prompt": "p", "metadata": ' + raw + "}"
    response = await service.client.post(
        "/tasks", content=content.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"field": "metadata", "reason": reason}]
    assert upstream.bodies == []
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"a": [{"b": [1, 2.5, True, None, "x"]}]}, id="four-levels-every-scalar"),
        pytest.param({"k": "v" * 4088}, id="exactly-4-KiB"),
    ],
)
async def test_metadata_at_the_limits_is_kept_as_given(
    recorded: tuple[Service, RecordingUpstream], metadata: dict[str, Any]
) -> None:
    """Four levels deep with every scalar kind, or exactly 4 KiB: accepted and returned as given."""
    service, _ = recorded
    response = await service.client.post("/tasks", json={"prompt": "p", "metadata": metadata})
    assert response.status_code == 202, response.text
    shown = await service.client.get(f"/tasks/{response.json()['id']}")
    assert shown.json()["metadata"] == metadata


async def test_idempotency_replays_treat_resolution_case_as_the_same_request(
    recorded: tuple[Service, RecordingUpstream],
) -> None:
    """`2k` and `2K` are one request (one task, one submit); `4K` with the same key is 422."""
    service, upstream = recorded
    headers = {"Idempotency-Key": "gpt2-order-7"}
    body = {"model": "gpt-image-2", "prompt": "p", "size": "1:1", "resolution": "2k"}
    first = await service.client.post("/tasks", json=body, headers=headers)
    again = await service.client.post("/tasks", json={**body, "resolution": "2K"}, headers=headers)
    other = await service.client.post("/tasks", json={**body, "resolution": "4K"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(upstream.bodies) == 1


async def test_fingerprints_of_requests_without_the_new_fields_are_unchanged() -> None:
    """A body without resolution or mask_url hashes as before, so keys sent earlier still replay."""
    request = TaskCreate.model_validate({"prompt": "a", "size": "1:1", "metadata": {"k": "v"}})
    before = {
        "prompt": "a",
        "model": "gpt-image-1.5",
        "size": "1:1",
        "quality": None,
        "image_urls": None,
        "n": 1,
        "metadata": {"k": "v"},
    }
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert fingerprint(request) == hashlib.sha256(canonical.encode()).hexdigest()


async def test_listing_filters_keep_their_edges(service: Service) -> None:
    """created_after is inclusive and created_before exclusive; prompt text matches in any
    case and literally (`%`, `_` and `/` are not wildcards nor escapes); a metadata key with
    an empty value, or with one alongside the prompt."""
    instant = utcnow() - timedelta(minutes=5)
    async with service.runtime.sessions() as session:
        at_instant = await make_task(session, created_at=instant, prompt="A Lighthouse 100%")
        later = await make_task(
            session, created_at=instant + timedelta(seconds=1), prompt="lighthouse_2"
        )
        await make_task(session, created_at=instant - timedelta(seconds=1), prompt="lighthouses")
        blank = await make_task(session, meta={"ticket": ""}, prompt="x")
        await make_task(session, meta={"ticket": "XXXX"}, prompt="y")
        slashed = await make_task(session, meta={"ticket": "XXXX"}, prompt="a/b/%")
        await make_task(session, prompt="a/b/c")

    async def listed(**filters: Any) -> list[str]:
        async with service.runtime.engine.connect() as db:
            found = await repository.list_tasks(
                db, repository.TaskFilter(**filters), limit=50, after=None
            )
        return [task.id for task, _ in found]

    window = {"created_after": instant, "created_before": instant + timedelta(seconds=1)}
    assert await listed(**window) == [at_instant.id]
    assert await listed(prompt_contains="LIGHTHOUSE 100%") == [at_instant.id]
    assert await listed(prompt_contains="thouse_") == [later.id]
    assert await listed(metadata_key="ticket") == [blank.id]
    assert await listed(prompt_contains="A/B/%") == [slashed.id]
    assert await listed(prompt_contains="b/%", metadata_key="ticket", metadata_value="XXXX") == [
        slashed.id
    ]
