"""The callback flow end to end: delivery, duplicates, stale news, outcomes, lost callbacks.

Every scenario's task is submitted when the module's stack starts, so they run
side by side; each test then waits for and checks its own task.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.stack import Stack, sha256, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCENARIOS = {
    "plain": "a red fox in the snow",
    "dup": "a lighthouse at dawn [sim:dup=3]",
    "concurrent_dup": "a paper boat [sim:concurrent_dup=5]",
    "late_processing": "an old clock [sim:late_processing]",
    "failed": "a broken vase [sim:outcome=failed]",
    "cancelled": "an empty stage [sim:outcome=cancelled]",
    "drop": "a lost letter [sim:drop]",
    # Done after 1 s, but the submit call is answered only after 3 s.
    "early_callback": "a fast hare [sim:submit_delay=3,eta=50]",
}

Tasks = dict[str, dict[str, Any]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def flow(stack: Stack) -> Tasks:
    """Every scenario's task, as accepted by POST /tasks (submitted side by side)."""
    tasks = await asyncio.gather(*(stack.submit(prompt) for prompt in SCENARIOS.values()))
    return dict(zip(SCENARIOS, tasks, strict=True))


async def callback_attempts(stack: Stack, upstream_id: str, count: int) -> list[dict[str, Any]]:
    """The simulator's callback attempts for a task, once there are at least ``count``."""

    async def probe() -> list[dict[str, Any]] | None:
        attempts: list[dict[str, Any]] = (await stack.sim.task(upstream_id))["callback_attempts"]
        return attempts if len(attempts) >= count else None

    return await wait_for(probe, what=f"{count} callback attempts for {upstream_id}")


def completed_transitions(stack: Stack, task_id: str) -> list[dict[str, Any]]:
    """The service's log lines that moved this task to completed."""
    return stack.logs("task_transition", task_id=task_id, status="completed")


async def test_completed_task_stores_the_simulators_exact_bytes(stack: Stack, flow: Tasks) -> None:
    """Submit, callback answered 200, completed, and the stored image is the provider's bytes."""
    task = flow["plain"]
    upstream_id = task["upstream_task_id"]
    assert task["status"] == "pending"
    assert upstream_id.startswith("task-unified-")

    done = await stack.wait_image(task["id"])
    assert done["status"] == "completed"
    assert done["progress"] == 100
    assert done["error"] is None
    image = done["image"]
    assert image["status"] == "stored", image

    provider = await stack.sim.task(upstream_id)
    assert provider["status"] == "completed"
    attempts = await callback_attempts(stack, upstream_id, 1)
    assert [attempt["status_code"] for attempt in attempts] == [200]
    assert provider["image_gets"] == 1

    served = await stack.image(task["id"])
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/png"
    assert served.headers["etag"] == f'"{image["sha256"]}"'
    original = await stack.sim.image_bytes(upstream_id)
    assert sha256(served.content) == sha256(original) == image["sha256"]
    assert image["size_bytes"] == len(original)
    assert (image["width"], image["height"]) == (64, 64)
    assert image["url"] == f"{stack.service_url}/tasks/{task['id']}/image"


@pytest.mark.parametrize(("scenario", "deliveries"), [("dup", 3), ("concurrent_dup", 5)])
async def test_duplicate_callbacks_apply_once_and_fetch_once(
    stack: Stack, flow: Tasks, scenario: str, deliveries: int
) -> None:
    """Repeated and simultaneous deliveries: all 2xx, one transition, one image fetch."""
    task = flow[scenario]
    upstream_id = task["upstream_task_id"]
    done = await stack.wait_image(task["id"])
    assert (done["status"], done["image"]["status"]) == ("completed", "stored")

    attempts = await callback_attempts(stack, upstream_id, deliveries)
    # No retries: every delivery got its 2xx at the first attempt.
    assert len(attempts) == deliveries
    assert {attempt["status_code"] for attempt in attempts} == {200}
    assert {attempt["attempt"] for attempt in attempts} == {1}

    recorded = await stack.sql(
        "SELECT outcome FROM callback_deliveries WHERE task_id = :id", id=task["id"]
    )
    assert len(recorded) == deliveries
    assert len(completed_transitions(stack, task["id"])) == 1
    assert (await stack.sim.task(upstream_id))["image_gets"] == 1
    assert len(stack.logs("image_stored", task_id=task["id"])) == 1


async def test_late_processing_callback_does_not_move_a_completed_task_back(
    stack: Stack, flow: Tasks
) -> None:
    """A stale processing snapshot after the terminal one leaves the task completed."""
    task = flow["late_processing"]
    upstream_id = task["upstream_task_id"]
    attempts = await callback_attempts(stack, upstream_id, 2)
    kinds = [(attempt["kind"], attempt["status_code"]) for attempt in attempts]
    assert kinds == [("terminal", 200), ("late_processing", 200)]

    done = await stack.wait_image(task["id"])
    assert (done["status"], done["progress"]) == ("completed", 100)
    assert done["image"]["status"] == "stored"
    assert len(completed_transitions(stack, task["id"])) == 1
    stale = await stack.sql(
        "SELECT outcome FROM callback_deliveries WHERE task_id = :id AND upstream_status = :s",
        id=task["id"],
        s="processing",
    )
    assert len(stale) == 1


@pytest.mark.parametrize(
    ("scenario", "code", "message"),
    [
        pytest.param(
            "failed",
            "generation_failed_no_content",
            "The simulator failed this task on request.",
            id="failed",
        ),
        pytest.param("cancelled", "cancelled", None, id="cancelled"),
    ],
)
async def test_failed_and_cancelled_outcomes_carry_the_reason(
    stack: Stack, flow: Tasks, scenario: str, code: str, message: str | None
) -> None:
    """A failed or cancelled task ends in that state with the provider's reason."""
    task = flow[scenario]
    done = await stack.wait_status(task["id"], scenario)
    assert done["error"]["code"] == code
    if message is not None:
        assert done["error"]["message"] == message
    assert done["image"] is None
    assert done["completed_at"] is not None
    attempts = await callback_attempts(stack, task["upstream_task_id"], 1)
    assert [attempt["status_code"] for attempt in attempts] == [200]
    assert (await stack.image(task["id"])).status_code == 404


async def test_dropped_callback_is_recovered_by_the_reconciler(stack: Stack, flow: Tasks) -> None:
    """With no callback at all, the reconciler's query completes the task and stores its image."""
    task = flow["drop"]
    upstream_id = task["upstream_task_id"]
    done = await stack.wait_image(task["id"])
    assert (done["status"], done["image"]["status"]) == ("completed", "stored")

    provider = await stack.sim.task(upstream_id)
    assert provider["callback_attempts"] == []
    assert provider["queries"] >= 1
    assert provider["image_gets"] == 1
    polled = stack.logs("task_polled", task_id=task["id"], reported="completed")
    assert [line["outcome"] for line in polled] == ["applied"]
    served = await stack.image(task["id"])
    assert sha256(served.content) == done["image"]["sha256"]


async def test_callback_before_the_submit_answer_completes_the_task(
    stack: Stack, flow: Tasks
) -> None:
    """A callback that beats the submit call's answer is matched by our id and applied."""
    task = flow["early_callback"]
    done = await stack.wait_image(task["id"])
    assert (done["status"], done["image"]["status"]) == ("completed", "stored")
    assert done["upstream_task_id"] == task["upstream_task_id"]

    events = [line["event"] for line in stack.logs(task_id=task["id"])]
    assert events.index("callback_received") < events.index("submit_accepted")
    # The late submit answer (pending) is older news than the completed task.
    assert [line["outcome"] for line in stack.logs("submit_accepted", task_id=task["id"])] == [
        "stale"
    ]
    provider = await stack.sim.task(task["upstream_task_id"])
    assert [attempt["status_code"] for attempt in provider["callback_attempts"]] == [200]
    assert provider["image_gets"] == 1
