"""Several processes on one database: downloads are claimed once across workers."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.pool import StackPool

pytestmark = pytest.mark.asyncio(loop_scope="session")

TASKS = 50


@pytest.mark.postgres
async def test_two_workers_fetch_every_image_exactly_once(postgres_stacks: StackPool) -> None:
    """The service's worker and an `imagetasks worker` share 50 downloads: each fetched once."""
    stack = await postgres_stacks.start()
    extra = await stack.start_extra_worker()
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
    assert all(line["recorded"] for line in stored)
    # Both processes took part: the exactly-once result is not one worker doing it all.
    by_service = stack.logs("image_stored")
    by_worker = [line for line in extra.log_lines() if line.get("event") == "image_stored"]
    assert len(by_service) + len(by_worker) == TASKS
    assert by_service
    assert by_worker
    extra.check_alive()


@pytest.mark.xfail(
    strict=True,
    reason="app/cli.py serve: --background defaults to True and overrides RUN_BACKGROUND",
)
async def test_run_background_false_starts_no_worker(stacks: StackPool) -> None:
    """`RUN_BACKGROUND=false` (as docker-compose sets for the API) keeps the loops out of serve."""
    stack = await stacks.start(RUN_BACKGROUND=False)
    # The worker logs worker_started in the lifespan, before /readyz can answer.
    assert stack.logs("Application startup complete.")
    assert stack.logs("worker_started") == []
