"""Every callback body shape and both enveloped image-URL shapes, applied from the callback.

The stack runs with ``CONFIRM_CALLBACKS=false``, so the snapshot and the image
link that reach the task are the ones parsed from the callback body, not from a
confirming query (or an early poll).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.pool import StackPool
from tests.e2e.stack import Stack, sha256, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

SHAPES = [
    ("published", "string"),
    ("envelope", "string"),
    ("envelope", "list"),
    ("bare", "string"),
    ("bare", "list"),
]

Tasks = dict[tuple[str, str], dict[str, Any]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def trusting_stack(module_stacks: StackPool) -> Stack:
    """A stack that applies terminal callbacks unconfirmed and polls only after 30 s."""
    # The slow poll keeps the reconciler from learning the outcome before the callback does.
    return await module_stacks.start(CONFIRM_CALLBACKS=False, RECONCILE_AFTER_SECONDS=30)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shaped(trusting_stack: Stack) -> Tasks:
    """One task per (body, url) shape, as accepted by POST /tasks."""
    return {
        (body, url): await trusting_stack.submit(f"a kite [sim:body={body},url={url}]")
        for body, url in SHAPES
    }


@pytest.mark.parametrize(("body", "url"), SHAPES)
async def test_callback_shape_is_parsed_and_applied(
    trusting_stack: Stack, shaped: Tasks, body: str, url: str
) -> None:
    """A published, envelope or bare body (URL a string or a list) completes and stores."""
    stack = trusting_stack
    task = shaped[(body, url)]
    upstream_id = task["upstream_task_id"]
    done = await stack.wait_image(task["id"])
    assert (done["status"], done["image"]["status"]) == ("completed", "stored")

    async def delivered() -> list[dict[str, Any]] | None:
        attempts: list[dict[str, Any]] = (await stack.sim.task(upstream_id))["callback_attempts"]
        return attempts or None

    attempts = await wait_for(delivered, what="the callback")
    assert [attempt["status_code"] for attempt in attempts] == [200]
    recorded = await stack.sql(
        "SELECT upstream_status, outcome, changed FROM callback_deliveries WHERE task_id = :id",
        id=task["id"],
    )
    assert [tuple(row) for row in recorded] == [("completed", "applied", True)]
    original = await stack.sim.image_bytes(upstream_id)
    assert done["image"]["sha256"] == sha256(original)
