"""Image-link faults through the real download worker: retries, renewal, refusals.

The stack caps images at 1 MiB. Every scenario's task is submitted when the
module's stack starts, so the slow ones (retry backoff) overlap the others.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.pool import StackPool
from tests.e2e.stack import Stack, sha256

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_IMAGE_BYTES = 1024 * 1024
METADATA_URL = "http://169.254.169.254/latest/meta-data"
SCENARIOS = {
    "image_503": "a harbour at night [sim:image_503=2]",
    "image_expired": "a desert road [sim:image_expired]",
    "not_image": "a blank page [sim:not_image]",
    "oversize_stream": "an endless scroll [sim:oversize]",
    "oversize_header": "a tall tale [sim:oversize=header]",
    "redirect": f"a cloud [sim:redirect_to={METADATA_URL}]",
}
# Backoff after a 503 grows from 2-4 s to 4-8 s: the retried image needs the longest.
RETRY_TIMEOUT = 60.0

Tasks = dict[str, dict[str, Any]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def image_stack(module_stacks: StackPool) -> Stack:
    """A stack that refuses images over 1 MiB."""
    return await module_stacks.start(MAX_IMAGE_BYTES=MAX_IMAGE_BYTES)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def faulty(image_stack: Stack) -> Tasks:
    """Every scenario's task, as accepted by POST /tasks."""
    return {name: await image_stack.submit(prompt) for name, prompt in SCENARIOS.items()}


async def assert_stored_intact(stack: Stack, task: dict[str, Any]) -> dict[str, Any]:
    """Wait for the image; check it is stored and is exactly the provider's bytes."""
    done = await stack.wait_image(task["id"], timeout=RETRY_TIMEOUT)
    assert done["status"] == "completed"
    assert done["image"]["status"] == "stored", done["image"]
    assert done["image"]["error"] is None
    served = await stack.image(task["id"])
    assert served.status_code == 200
    assert sha256(served.content) == done["image"]["sha256"]
    return done


async def assert_refused(stack: Stack, task: dict[str, Any], code: str) -> dict[str, Any]:
    """Wait for the image; check the download failed for good with ``code``, nothing stored."""
    done = await stack.wait_image(task["id"])
    assert done["status"] == "completed"
    image = done["image"]
    assert image["status"] == "failed", image
    assert image["error"]["code"] == code, image["error"]
    assert image["url"] is None
    assert image["sha256"] is None
    served = await stack.image(task["id"])
    assert served.status_code == 404
    assert served.json()["error"]["code"] == "image_not_stored"
    assert not [path for path in stack.stored_files() if task["id"] in path.name]
    return done


async def test_image_503_is_retried_until_stored(image_stack: Stack, faulty: Tasks) -> None:
    """Two 503 answers from the image link, then the image is stored, byte for byte."""
    task = faulty["image_503"]
    await assert_stored_intact(image_stack, task)
    provider = await image_stack.sim.task(task["upstream_task_id"])
    assert provider["image_gets"] == 3
    assert len(provider["links"]) == 1
    failures = image_stack.logs("download_failed", task_id=task["id"])
    assert [line["code"] for line in failures] == ["http_503", "http_503"]
    original = await image_stack.sim.image_bytes(task["upstream_task_id"])
    assert (await image_stack.image(task["id"])).content == original


async def test_expired_link_is_renewed_once_and_stored(image_stack: Stack, faulty: Tasks) -> None:
    """A refused (403) link is renewed from the query API once, and the new one is stored."""
    task = faulty["image_expired"]
    await assert_stored_intact(image_stack, task)
    provider = await image_stack.sim.task(task["upstream_task_id"])
    links = provider["links"]
    assert len(links) == 2
    assert [(link["gets"], link["refusals"]) for link in links] == [(1, 1), (1, 0)]
    assert len(image_stack.logs("image_link_renewed", task_id=task["id"])) == 1


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        ("not_image", "not_an_image"),
        ("oversize_stream", "too_large"),
        ("oversize_header", "too_large"),
        ("redirect", "blocked_address"),
    ],
)
async def test_bad_image_links_fail_for_good(
    image_stack: Stack, faulty: Tasks, scenario: str, code: str
) -> None:
    """HTML posing as PNG, a body over the cap, a redirect to cloud metadata: refused."""
    task = faulty[scenario]
    await assert_refused(image_stack, task, code)
    provider = await image_stack.sim.task(task["upstream_task_id"])
    # A final refusal is not retried, and a link that answered is not renewed.
    assert provider["image_gets"] == 1
    assert len(provider["links"]) == 1
    assert not image_stack.spool_files(f"{task['id']}*")
