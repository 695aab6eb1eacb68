"""The callback route: bad input changes nothing, duplicates are harmless,
terminal callbacks are confirmed with the query API."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.callback_urls import sign
from app.config import Settings
from tests.conftest import WEBHOOK_SECRET, Service, make_settings
from tests.helpers import (
    NEAR_MISS_KINDS,
    GatedQueries,
    dumps,
    near_miss_token,
    simulator_transport,
    task_body,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def hook(task_id: str, token: str | None = None) -> str:
    """The webhook path for a task (with its real token unless one is given)."""
    return f"/webhooks/starmagic/{task_id}/{token or sign(task_id, WEBHOOK_SECRET)}"


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll an async predicate until it holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class Stack:
    """The service and its in-process simulator."""

    def __init__(
        self, service: Service, simulator: httpx.AsyncClient, upstream: GatedQueries
    ) -> None:
        self.service = service
        self.sim = simulator
        self.upstream = upstream

    async def submit(self, prompt: str = "a cat", **fields: Any) -> dict[str, Any]:
        response = await self.service.client.post("/tasks", json={"prompt": prompt, **fields})
        assert response.status_code == 202, response.text
        task: dict[str, Any] = response.json()
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        task: dict[str, Any] = (await self.service.client.get(f"/tasks/{task_id}")).json()
        return task

    async def deliveries(self, task_id: str) -> list[tuple[str, bool]]:
        rows = await self.service.sql(
            "SELECT outcome, changed FROM callback_deliveries WHERE task_id = :id ORDER BY id",
            id=task_id,
        )
        return [(outcome, bool(changed)) for outcome, changed in rows]


async def build_stack(service_factory: Any, settings: Settings) -> Stack:
    transport, _ = simulator_transport(estimated_time=100, time_scale=10.0)
    upstream = GatedQueries(transport)
    service: Service = await service_factory(settings, upstream)
    simulator = httpx.AsyncClient(transport=transport, base_url="http://starmagic.test")
    return Stack(service, simulator, upstream)


@pytest_asyncio.fixture(loop_scope="session")
async def stack(service_factory: Any, settings: Settings) -> Stack:
    """Confirmation on (the default); the simulator's tasks stay pending for a long time."""
    return await build_stack(service_factory, settings)


@pytest_asyncio.fixture(loop_scope="session")
async def trusting(service_factory: Any, database_url: str, tmp_path: Path) -> Stack:
    """CONFIRM_CALLBACKS=false: callbacks are applied as they come."""
    settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    return await build_stack(service_factory, settings)


async def test_bad_tokens_and_unknown_tasks_get_the_same_404(stack: Stack) -> None:
    """A wrong token and an unknown task are indistinguishable, and change nothing."""
    task = await stack.submit()
    body = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
    wrong = await stack.service.client.post(hook(task["id"], "0" * 32), content=body)
    unknown = await stack.service.client.post(hook("tsk_unknown"), content=body)
    assert wrong.status_code == unknown.status_code == 404
    assert wrong.json() == unknown.json()
    assert (await stack.task(task["id"]))["status"] == "pending"
    assert await stack.deliveries(task["id"]) == []


async def test_near_miss_tokens_are_refused_and_change_nothing(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Each near miss of a valid token gets the unknown-callback 404; the real ones work."""
    previous = "previous-webhook-secret-0123"
    settings = make_settings(database_url, tmp_path, webhook_secret=f"{WEBHOOK_SECRET},{previous}")
    stack = await build_stack(service_factory, settings)
    task, other = await stack.submit(), await stack.submit("a dog")
    body = dumps(task_body("processing", upstream_id=task["upstream_task_id"], progress=30))
    valid = sign(task["id"], WEBHOOK_SECRET)
    for kind in NEAR_MISS_KINDS:
        token = near_miss_token(
            kind,
            valid,
            other_task=sign(other["id"], WEBHOOK_SECRET),
            retired=sign(task["id"], "retired-webhook-secret-0000"),
        )
        response = await stack.service.client.post(hook(task["id"], token), content=body)
        assert response.status_code == 404, kind
        assert response.json()["error"]["code"] == "not_found", kind
    assert (await stack.task(task["id"]))["status"] == "pending"
    assert await stack.deliveries(task["id"]) == []
    # The control: the same body under the still-configured previous secret is applied.
    accepted = await stack.service.client.post(
        hook(task["id"], sign(task["id"], previous)), content=body
    )
    assert accepted.status_code == 200, accepted.text
    assert (await stack.task(task["id"]))["status"] == "processing"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "malformed_callback"),
        (b"\xff\xfe\x00garbage", 400, "malformed_callback"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "malformed_callback"),
        (b"[]", 422, "not_a_snapshot"),
        (b'"completed"', 422, "not_a_snapshot"),
        (b'{"code": 200, "data": {"status": 5}}', 422, "not_a_snapshot"),
        (b'{"status": "exploded"}', 422, "not_a_snapshot"),
        (b'{"code": 500, "data": {"status": "completed"}}', 422, "not_a_snapshot"),
        (b'{"status": "completed", "id": 12}', 422, "not_a_snapshot"),
    ],
)
async def test_bodies_that_are_not_snapshots_are_refused(
    stack: Stack, raw: bytes, status: int, code: str
) -> None:
    """Malformed JSON is 400, JSON of the wrong shape 422; neither changes the task."""
    task = await stack.submit()
    response = await stack.service.client.post(hook(task["id"]), content=raw)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert (await stack.task(task["id"]))["status"] == "pending"
    assert await stack.deliveries(task["id"]) == []


async def test_oversized_and_non_json_bodies_are_refused(stack: Stack) -> None:
    """Over 1 MiB is 413; a form or HTML content type is 415."""
    task = await stack.submit()
    big = dumps({**task_body("completed"), "padding": "x" * (1024 * 1024)})
    assert (await stack.service.client.post(hook(task["id"]), content=big)).status_code == 413
    form = await stack.service.client.post(hook(task["id"]), data={"status": "completed"})
    assert form.status_code == 415
    assert await stack.deliveries(task["id"]) == []


async def test_a_snapshot_about_another_provider_task_is_refused(stack: Stack) -> None:
    """A body naming a different provider id is 422 and changes nothing."""
    task = await stack.submit()
    body = dumps(task_body("completed", upstream_id="task-unified-1-notours"))
    response = await stack.service.client.post(hook(task["id"]), content=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "task_mismatch"
    assert (await stack.task(task["id"]))["status"] == "pending"


async def test_a_forged_completion_is_only_a_hint(stack: Stack) -> None:
    """With confirmation on, the query API's answer wins over the callback's claim."""
    task = await stack.submit()
    forged = task_body(
        "completed", upstream_id=task["upstream_task_id"], url="https://evil.example/x.png"
    )
    response = await stack.service.client.post(hook(task["id"]), content=dumps(forged))
    assert response.status_code == 200
    assert response.json()["outcome"] == "confirming"

    async def confirmed() -> bool:
        rows = await stack.service.sql(
            "SELECT poll_lease_until FROM tasks WHERE id = :id", id=task["id"]
        )
        queried = (await stack.sim.get(f"/_sim/tasks/{task['upstream_task_id']}")).json()
        return rows[0][0] is None and queried["queries"] >= 1

    await wait_for(confirmed)
    after = await stack.task(task["id"])
    assert after["status"] in ("pending", "processing")
    assert after["image"] is None


async def test_a_real_completion_applies_the_query_apis_link(stack: Stack) -> None:
    """The confirmed state and image link come from the query API, not the callback."""
    task = await stack.submit()
    done = await stack.sim.post(f"/_sim/tasks/{task['upstream_task_id']}/complete", json={})
    assert done.status_code == 200
    callback = task_body(
        "completed", upstream_id=task["upstream_task_id"], url="https://evil.example/x.png"
    )
    response = await stack.service.client.post(hook(task["id"]), content=dumps(callback))
    assert response.status_code == 200

    async def completed() -> bool:
        return (await stack.task(task["id"]))["status"] == "completed"

    await wait_for(completed)
    rows = await stack.service.sql(
        "SELECT status, source_url FROM images WHERE task_id = :id", id=task["id"]
    )
    assert len(rows) == 1
    assert rows[0][0] == "pending"
    assert rows[0][1].startswith("http://starmagic.test/")
    again = await stack.service.client.post(hook(task["id"]), content=dumps(callback))
    assert again.json()["outcome"] == "duplicate"
    assert [outcome for outcome, _ in await stack.deliveries(task["id"])] == [
        "confirming",
        "duplicate",
    ]


async def flood(stack: Stack, task_id: str, raw: bytes, count: int = 50) -> list[str]:
    """Deliver one callback body `count` times at once, then `count` times in a row."""
    at_once = await asyncio.gather(
        *(stack.service.client.post(hook(task_id), content=raw) for _ in range(count))
    )
    in_a_row = [await stack.service.client.post(hook(task_id), content=raw) for _ in range(count)]
    assert {response.status_code for response in at_once + in_a_row} == {200}
    return [response.json()["outcome"] for response in at_once + in_a_row]


async def test_fifty_terminal_callbacks_cause_one_query(stack: Stack) -> None:
    """50 completions at once and 50 in a row: one confirmation query, 99 duplicates."""
    task = await stack.submit()
    upstream_id = task["upstream_task_id"]
    assert (await stack.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
    completed = dumps(task_body("completed", upstream_id=upstream_id))
    outcomes = await flood(stack, task["id"], completed)
    await stack.service.runtime.reconciler.wait_idle()
    assert (await stack.task(task["id"]))["status"] == "completed"
    assert stack.upstream.queries[upstream_id] == 1
    assert Counter(outcomes) == {"confirming": 1, "duplicate": 99}
    assert Counter(outcome for outcome, _ in await stack.deliveries(task["id"])) == Counter(
        outcomes
    )


async def test_a_leaked_callback_url_buys_one_query_per_spacing(stack: Stack) -> None:
    """False completions, 100 while the query is out and 50 after: one query until the spacing."""
    reconciler = stack.service.runtime.reconciler
    reconciler.query_spacing = timedelta(hours=1)  # nothing may query again within the test
    task = await stack.submit()
    upstream_id = task["upstream_task_id"]
    forged = dumps(task_body("completed", upstream_id=upstream_id))

    stack.upstream.hold()
    first = await stack.service.client.post(hook(task["id"]), content=forged)
    assert first.json()["outcome"] == "confirming"
    await stack.upstream.held.wait()  # the confirmation's query is out; the provider said pending
    during = await flood(stack, task["id"], forged)
    stack.upstream.release()
    await reconciler.wait_idle()
    after = await flood(stack, task["id"], forged)
    await reconciler.wait_idle()

    assert stack.upstream.queries[upstream_id] == 1
    assert set(during) == set(after) == {"duplicate"}
    assert (await stack.task(task["id"]))["status"] == "pending"
    assert await reconciler.run_once() == 0  # due again, but not before the spacing
    reconciler.query_spacing = timedelta(0)
    assert await reconciler.run_once() == 1  # the hint is still asked about, once
    assert stack.upstream.queries[upstream_id] == 2


async def test_duplicates_and_late_news_are_recorded_but_change_nothing(trusting: Stack) -> None:
    """Every delivery is recorded; only the first completed one changes the task."""
    task = await trusting.submit()
    completed = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
    stale = dumps(task_body("processing", upstream_id=task["upstream_task_id"], progress=50))
    failed = dumps(
        task_body("failed", upstream_id=task["upstream_task_id"], error={"message": "late"})
    )
    outcomes = []
    for raw in (completed, completed, stale, failed):
        response = await trusting.service.client.post(hook(task["id"]), content=raw)
        assert response.status_code == 200
        outcomes.append(response.json()["outcome"])
    assert outcomes == ["applied", "duplicate", "stale", "anomaly"]
    assert await trusting.deliveries(task["id"]) == [
        ("applied", True),
        ("duplicate", False),
        ("stale", False),
        ("anomaly", False),
    ]
    after = await trusting.task(task["id"])
    assert after["status"] == "completed"
    assert after["image"]["status"] == "pending"


@pytest.mark.parametrize("shape", ["published", "envelope", "bare"])
@pytest.mark.parametrize("url_shape", ["string", "list"])
async def test_every_body_shape_and_url_shape_is_accepted(
    trusting: Stack, shape: str, url_shape: str
) -> None:
    """Published, enveloped or bare, url as a string or a list: the same link is queued."""
    task = await trusting.submit()
    link = "https://cdn.example.com/out.png"
    body = task_body(
        "completed",
        upstream_id=task["upstream_task_id"],
        envelope=shape == "envelope",
        published=shape == "published",
        url=link if url_shape == "string" else [link, "https://cdn.example.com/other.png"],
    )
    if shape == "published" and url_shape == "list":
        body["results"] = [link]  # published results are a list of strings already
    response = await trusting.service.client.post(hook(task["id"]), content=json.dumps(body))
    assert response.status_code == 200
    rows = await trusting.service.sql(
        "SELECT source_url FROM images WHERE task_id = :id", id=task["id"]
    )
    assert rows == [(link,)]


async def test_a_published_callback_queues_one_download_per_result(trusting: Stack) -> None:
    """`results` with three links for n=3: three images queued in order, expiring in 24 h."""
    task = await trusting.submit(model="gpt-image-2", n=3)
    links = [f"https://cdn.example.com/{n}.png" for n in range(3)]
    body = task_body("completed", upstream_id=task["upstream_task_id"], urls=links, published=True)
    response = await trusting.service.client.post(hook(task["id"]), content=json.dumps(body))
    assert response.json()["outcome"] == "applied"
    shown = await trusting.task(task["id"])
    assert [image["index"] for image in shown["images"]] == [0, 1, 2]
    assert {image["status"] for image in shown["images"]} == {"pending"}
    assert shown["image"] == shown["images"][0]
    rows = await trusting.service.sql(
        "SELECT position, source_url FROM images WHERE task_id = :id ORDER BY position",
        id=task["id"],
    )
    assert rows == list(enumerate(links))
    expiry = datetime.fromisoformat(shown["image"]["source_expires_at"])
    assert timedelta(hours=23) < expiry - datetime.now(UTC) <= timedelta(hours=24)


async def test_a_link_without_expiry_lives_24_hours_from_the_providers_completion(
    trusting: Stack,
) -> None:
    """Enveloped, `completed` two hours ago, no `expires_at`: the link ends 22 h from now."""
    task = await trusting.submit()
    finished = int(datetime.now(UTC).timestamp()) - 2 * 3600
    body = task_body("completed", upstream_id=task["upstream_task_id"])
    body["data"]["completed"] = finished
    del body["data"]["result"]["images"][0]["expires_at"]
    response = await trusting.service.client.post(hook(task["id"]), content=json.dumps(body))
    assert response.json()["outcome"] == "applied"
    shown = await trusting.task(task["id"])
    expiry = datetime.fromisoformat(shown["image"]["source_expires_at"])
    expected = datetime.fromtimestamp(finished, UTC) + timedelta(hours=24)
    assert abs(expiry - expected) < timedelta(seconds=2)


async def test_a_published_failure_keeps_the_providers_code_and_says_what_to_do(
    trusting: Stack,
) -> None:
    """A content-policy failure is not worth a retry; a timeout is."""
    for code, retryable in (("content_policy_violation", False), ("generation_timeout", True)):
        task = await trusting.submit()
        error = {"code": code, "message": "no", "type": "task_error"}
        body = task_body(
            "failed", upstream_id=task["upstream_task_id"], published=True, error=error
        )
        response = await trusting.service.client.post(hook(task["id"]), content=json.dumps(body))
        assert response.json()["outcome"] == "applied"
        shown = await trusting.task(task["id"])
        assert shown["error"] == {"code": code, "message": "no", "retryable": retryable}


@pytest.mark.postgres
async def test_concurrent_identical_deliveries_transition_once(
    service_factory: Any, postgres_database: str, tmp_path: Path
) -> None:
    """On PostgreSQL, 20 concurrent completed deliveries: one transition, one download."""
    settings = make_settings(postgres_database, tmp_path, confirm_callbacks=False)
    stack = await build_stack(service_factory, settings)
    task = await stack.submit()
    raw = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
    responses = await asyncio.gather(
        *(stack.service.client.post(hook(task["id"]), content=raw) for _ in range(20))
    )
    assert {response.status_code for response in responses} == {200}
    outcomes = sorted(response.json()["outcome"] for response in responses)
    assert outcomes == ["applied"] + ["duplicate"] * 19
    rows = await stack.service.sql(
        "SELECT count(*) FILTER (WHERE changed), count(*) FROM callback_deliveries"
        " WHERE task_id = :id",
        id=task["id"],
    )
    assert rows == [(1, 20)]
    queued = await stack.service.sql(
        "SELECT count(*) FROM images WHERE status = 'pending' AND task_id = :id", id=task["id"]
    )
    assert queued == [(1,)]
