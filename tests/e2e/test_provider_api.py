"""The provider's published API end to end: the simulator answers in the
published shape (its default), and the service stores what it lists."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.e2e.pool import StackPool
from tests.e2e.stack import Stack, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_published_callback_ends_in_a_stored_image(stacks: StackPool) -> None:
    """Results-shaped callback and query: the image is stored, intact, with usage kept."""
    stack = await stacks.start()
    task = await stack.submit("a harbour at night")
    assert task["usage"]["billing_rule"] == "per_call"
    done = await stack.wait_image(task["id"])
    assert done["image"]["status"] == "stored", done["image"]
    provider = await stack.sim.task(task["upstream_task_id"])
    assert provider["callback_attempts"], "the provider called back"
    body = (await stack.image(task["id"])).content
    assert hashlib.sha256(body).hexdigest() == done["image"]["sha256"]
    assert done["can_cancel"] is False
    delivered = await stack.sql(
        "SELECT outcome FROM callback_deliveries WHERE task_id = :id", id=task["id"]
    )
    assert ("confirming",) in delivered


async def test_several_images_are_each_stored_once(stacks: StackPool) -> None:
    """gpt-image-2 with n=3: three images, three objects, each fetched exactly once."""
    stack = await stacks.start()
    task = await stack.submit("three lanterns", model="gpt-image-2", n=3, size="1:1")
    done = await stack.wait_task(
        task["id"],
        lambda t: (
            len(t["images"]) == 3 and all(image["status"] == "stored" for image in t["images"])
        ),
        timeout=60,
        what="three stored images",
    )
    hashes = set()
    for image in done["images"]:
        served = await stack.client.get(f"/tasks/{task['id']}/images/{image['index']}")
        assert served.status_code == 200
        assert hashlib.sha256(served.content).hexdigest() == image["sha256"]
        hashes.add(image["sha256"])
    assert len(hashes) == 3, "each image has its own bytes"
    assert len(stack.stored_files()) == 3

    async def variants() -> bool:
        return len(stack.variant_files()) == 6

    # And two WebP variants of each, written just after it is stored.
    await wait_for(variants, timeout=30, what="a thumb and a preview of each image")
    thumb = await stack.client.get(f"/tasks/{task['id']}/images/2", params={"variant": "thumb"})
    assert (thumb.status_code, thumb.headers["content-type"]) == (200, "image/webp")
    assert thumb.headers["etag"] == f'"{done["images"][2]["sha256"]}.thumb"'
    stats = await stack.sim.stats()
    assert sorted(stats["image_gets_per_link"].values()) == [1, 1, 1]
    listed = await stack.client.get("/tasks", params={"image_status": "stored"})
    assert [item["id"] for item in listed.json()["items"]] == [task["id"]]


async def test_cancelling_a_running_task_is_confirmed_by_the_provider(stacks: StackPool) -> None:
    """POST /cancel on a long task: the provider cancels it, the task is cancelled, no image."""
    stack = await stacks.start()
    task = await stack.submit("a long wait [sim:eta=1000]")
    response = await stack.client.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["error"]["retryable"] is False
    provider = await stack.sim.task(task["upstream_task_id"])
    assert provider["status"] == "cancelled"

    async def callback_seen() -> bool:
        rows = await stack.sql(
            "SELECT outcome FROM callback_deliveries WHERE task_id = :id", id=task["id"]
        )
        return bool(rows)

    await wait_for(callback_seen, what="the provider's cancelled callback")
    after = await stack.task(task["id"])
    assert (after["status"], after["images"]) == ("cancelled", [])
    again = await stack.client.post(f"/tasks/{task['id']}/cancel")
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("directives", "code", "retryable"),
    [
        ("outcome=failed,error_code=content_policy_violation", "content_policy_violation", False),
        ("outcome=failed,error_code=generation_timeout", "generation_timeout", True),
    ],
)
async def test_a_failed_task_keeps_the_providers_code_and_says_whether_to_resubmit(
    stack: Stack, directives: str, code: str, retryable: bool
) -> None:
    """The published `error` of a failed task: its code on the task, and `retryable`."""
    task = await stack.submit(f"a sketch [sim:{directives}]")
    done = await stack.wait_status(task["id"], "failed")
    assert (done["error"]["code"], done["error"]["retryable"]) == (code, retryable)


@pytest.mark.parametrize(
    ("status", "code", "retryable", "answer"),
    [
        (400, "invalid_parameters", False, 502),
        (401, "unauthorized", True, 502),
        (402, "quota_exceeded", True, 502),
        (403, "permission_denied", True, 502),
        (429, "rate_limit_exceeded", True, 503),
    ],
)
async def test_submit_refusals_keep_the_providers_code(
    stack: Stack, status: int, code: str, retryable: bool, answer: int
) -> None:
    """Refused at submit: 502 (503 with Retry-After once 429s outlast our retries)."""
    response = await stack.client.post("/tasks", json={"prompt": f"x [sim:submit_status={status}]"})
    assert response.status_code == answer, response.text
    detail = response.json()["error"]["details"][0]
    assert (detail["provider_status"], detail["provider_code"]) == (status, code)
    if status == 429:
        assert int(response.headers["retry-after"]) >= 1
    shown = await stack.task(detail["task_id"])
    assert shown["status"] == "failed"
    assert (shown["error"]["code"], shown["error"]["retryable"]) == (code, retryable)


async def test_a_500_at_submit_leaves_the_outcome_unknown(stack: Stack) -> None:
    """The provider may have created the task: it stays `submitting`, never re-sent."""
    response = await stack.client.post("/tasks", json={"prompt": "x [sim:submit_status=500]"})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "submitting"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": "gpt-image-2", "size": "1024x1536", "quality": "low"},
        {"model": "gpt-image-2", "size": "16:9", "resolution": "2k"},
        {"model": "gpt-image-2-beta", "size": "3:2", "resolution": "1K"},
    ],
    ids=["1.5-defaults", "2-wxh", "2-ratio", "beta-ratio"],
)
async def test_each_model_within_its_rules_is_accepted_and_stored(
    stack: Stack, fields: dict[str, Any]
) -> None:
    """The simulator validates each model as the provider does: what we send, it takes."""
    task = await stack.submit("a map", **fields)
    assert task["model"] == fields.get("model", "gpt-image-1.5")
    done = await stack.wait_image(task["id"])
    assert done["image"]["status"] == "stored", done["image"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "gpt-image-2", "size": "1000x1000"}, "size"),
        ({"model": "gpt-image-2", "n": 11}, "n"),
        ({"model": "gpt-image-2", "mask_url": "https://example.com/m.png"}, "mask_url"),
        ({"model": "gpt-image-2-beta", "quality": "high"}, "quality"),
        ({"model": "gpt-image-2-beta", "size": "1024x1024"}, "size"),
        ({"model": "gpt-image-1.5", "resolution": "1K"}, "resolution"),
    ],
)
async def test_a_request_outside_its_models_rules_never_reaches_the_provider(
    stack: Stack, fields: dict[str, Any], field: str
) -> None:
    """422 naming the field; the simulator sees no submission."""
    before = (await stack.sim.stats())["submit_requests"]
    response = await stack.client.post("/tasks", json={"prompt": "p", **fields})
    assert response.status_code == 422, response.text
    assert field in [detail["field"] for detail in response.json()["error"]["details"]]
    assert (await stack.sim.stats())["submit_requests"] == before
