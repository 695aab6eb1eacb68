"""Forged callbacks against the real webhook: a wrong token changes nothing, and a
correctly signed lie costs at most one query, because terminal callbacks are confirmed.

The stack polls only after ten quiet minutes, so every query the simulator
counts here comes from a callback's confirmation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.pool import StackPool
from tests.e2e.stack import Stack, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

# 1000 simulated seconds: pending for 2 s, then processing for 18 s of real time.
SLOW_PROMPT = "a glacier, slowly [sim:eta=1000]"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def quiet_stack(module_stacks: StackPool) -> Stack:
    """A stack whose reconciler waits 10 minutes before polling a quiet task."""
    return await module_stacks.start(RECONCILE_AFTER_SECONDS=600)


def forged_completion(upstream_id: str, image_url: str) -> dict[str, Any]:
    """A well-formed completed snapshot that the provider never sent."""
    return {
        "code": 200,
        "data": {
            "id": upstream_id,
            "status": "completed",
            "progress": 100,
            "created": int(time.time()),
            "completed": int(time.time()),
            "result": {"images": [{"url": image_url, "expires_at": int(time.time()) + 86400}]},
        },
    }


async def processing_task(stack: Stack) -> dict[str, Any]:
    """A task the simulator reports as processing, for a good while yet."""
    task = await stack.submit(SLOW_PROMPT)
    upstream_id = task["upstream_task_id"]
    assert task["status"] == "pending"

    async def processing() -> bool:
        status: str = (await stack.sim.task(upstream_id))["status"]
        return status == "processing"

    await wait_for(processing, what="the simulator to start processing")
    return task


async def stored_task(stack: Stack) -> dict[str, Any]:
    """A completed task whose image the service has stored (its link fetched once)."""
    task = await stack.submit("a decoy")
    done = await stack.wait_image(task["id"])
    assert done["image"]["status"] == "stored"
    return task


async def deliveries(stack: Stack, task_id: str) -> list[Any]:
    """The service's recorded deliveries for a task."""
    return await stack.sql(
        "SELECT upstream_status, outcome FROM callback_deliveries WHERE task_id = :id", id=task_id
    )


async def test_wrong_token_is_refused_and_changes_nothing(quiet_stack: Stack) -> None:
    """A callback with a bad token, or for an unknown task, gets the same 404; nothing changes."""
    stack = quiet_stack
    task = await stack.submit(SLOW_PROMPT)
    upstream_id = task["upstream_task_id"]
    body = forged_completion(upstream_id, f"{stack.simulator_url}/files/forged.png")
    before = await stack.task(task["id"])
    assert before["status"] == "pending"

    wrong = await stack.post_callback(task["id"], body, token="0" * 32)
    unknown = await stack.post_callback("tsk_01ZZZZZZZZZZZZZZZZZZZZZZZZ", body)
    assert wrong.status_code == unknown.status_code == 404
    assert wrong.json() == unknown.json()

    assert await stack.task(task["id"]) == before
    assert await deliveries(stack, task["id"]) == []
    assert (await stack.sim.task(upstream_id))["queries"] == 0


async def test_signed_forgery_is_only_a_hint(quiet_stack: Stack) -> None:
    """A correctly signed but false completion is accepted, confirmed once, and not applied."""
    stack = quiet_stack
    # The forgery points at a real, live image link (another task's), so a fetch would count.
    task, decoy = await asyncio.gather(processing_task(stack), stored_task(stack))
    upstream_id = task["upstream_task_id"]
    decoy_link = (await stack.sim.task(decoy["upstream_task_id"]))["links"][-1]
    body = forged_completion(upstream_id, decoy_link["url"])

    response = await stack.post_callback(task["id"], body)
    assert response.status_code == 200
    assert response.json() == {"received": True, "outcome": "confirming"}

    async def confirmed() -> dict[str, Any] | None:
        current = await stack.task(task["id"])
        return current if current["status"] != "pending" else None

    # The confirmation asks the query API, which says processing: that is what applies.
    current = await wait_for(confirmed, what="the confirmation query to be applied")
    assert current["status"] == "processing"
    assert current["image"] is None
    assert current["completed_at"] is None
    assert await deliveries(stack, task["id"]) == [("completed", "confirming")]

    # A negative check needs a window: a few reconciler rounds (1 s apart) later, still
    # exactly one query, and the forged link never fetched.
    await asyncio.sleep(3)
    provider = await stack.sim.task(upstream_id)
    assert provider["queries"] == 1
    assert provider["status"] == "processing"
    assert provider["image_gets"] == 0
    assert (await stack.sim.task(decoy["upstream_task_id"]))["links"][-1] == decoy_link
    assert (await stack.task(task["id"]))["status"] == "processing"


DUPLICATED = 30


async def test_duplicate_callbacks_cost_one_confirmation_query(quiet_stack: Stack) -> None:
    """Three deliveries of each terminal callback: one confirming query per task, not more."""
    stack = quiet_stack
    tasks = await asyncio.gather(
        *(stack.submit(f"echo {number} [sim:dup=3]") for number in range(DUPLICATED))
    )
    await asyncio.gather(*(stack.wait_image(task["id"]) for task in tasks))

    async def all_delivered() -> bool:
        provider = await stack.sim.tasks()
        mine = {task["upstream_task_id"] for task in tasks}
        return all(len(t["callback_attempts"]) >= 3 for t in provider if t["id"] in mine)

    await wait_for(all_delivered, what="three deliveries of every callback")
    # The reconciler waits ten minutes here, so every query is a confirmation. Before the
    # fix, 30 tasks with 3 deliveries each hit a double query on several tasks every run.
    queries = (await stack.sim.stats())["queries_per_task"]
    assert [queries[task["upstream_task_id"]] for task in tasks] == [1] * DUPLICATED


async def test_a_flood_of_one_tasks_callbacks_costs_one_query(quiet_stack: Stack) -> None:
    """50 completions of one task at once and 50 in a row: one query, one image, 99 duplicates."""
    stack = quiet_stack
    task = await stack.submit("a lighthouse [sim:drop]")
    upstream_id = task["upstream_task_id"]

    async def finished() -> dict[str, Any] | None:
        provider = await stack.sim.task(upstream_id)
        return provider if provider["status"] == "completed" else None

    provider = await wait_for(finished, what="the simulator to finish the task")
    body = forged_completion(upstream_id, provider["links"][-1]["url"])
    at_once = await asyncio.gather(*(stack.post_callback(task["id"], body) for _ in range(50)))
    in_a_row = [await stack.post_callback(task["id"], body) for _ in range(50)]
    assert {response.status_code for response in at_once + in_a_row} == {200}

    assert (await stack.wait_image(task["id"]))["image"]["status"] == "stored"
    outcomes = Counter(response.json()["outcome"] for response in at_once + in_a_row)
    assert outcomes == {"confirming": 1, "duplicate": 99}
    assert Counter(outcome for _, outcome in await deliveries(stack, task["id"])) == outcomes
    provider = await stack.sim.task(upstream_id)
    assert provider["queries"] == 1
    assert provider["image_gets"] == 1
