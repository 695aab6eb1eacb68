"""Several processes on one database: downloads are claimed once across workers."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.pool import StackPool

pytestmark = pytest.mark.asyncio(loop_scope="session")

TASKS = 50


@pytest.mark.postgres
async def test_two_workers_fetch_every_image_exactly_once(postgres_stacks: StackPool) -> None:
    """Two `imagetasks worker` processes share 50 downloads: each image fetched exactly once."""
    # The docker-compose shape: an API process without loops, and separate workers.
    stack = await postgres_stacks.start(RUN_BACKGROUND=False)
    workers = [await stack.start_extra_worker() for _ in range(2)]
    # Each download trickles over a second, so one worker's 4 slots cannot take them all.
    submitted = await asyncio.gather(
        *(stack.submit(f"tile {number} [sim:image_slow=1]") for number in range(TASKS))
    )
    done = await asyncio.gather(*(stack.wait_image(task["id"], timeout=120) for task in submitted))
    assert [task["image"]["status"] for task in done] == ["stored"] * TASKS

    stats = await stack.sim.stats()
    gets = stats["image_gets_per_task"]
    assert sorted(gets[task["upstream_task_id"]] for task in submitted) == [1] * TASKS
    assert stats["image_gets"] == TASKS
    assert len(stack.stored_files()) == TASKS

    stored = stack.all_logs("image_stored")
    assert len(stored) == TASKS
    assert stack.logs("image_stored") == []  # the API process runs no loops
    # Both workers took part: the exactly-once result is not one worker doing it all.
    for worker in workers:
        worker.check_alive()
        assert [line for line in worker.log_lines() if line.get("event") == "image_stored"]


async def test_run_background_false_starts_no_worker(stacks: StackPool) -> None:
    """`RUN_BACKGROUND=false` (as docker-compose sets for the API) keeps the loops out of serve."""
    stack = await stacks.start(RUN_BACKGROUND=False)
    # The worker logs worker_started in the lifespan, before /readyz can answer.
    assert stack.logs("Application startup complete.")
    assert stack.logs("worker_started") == []
