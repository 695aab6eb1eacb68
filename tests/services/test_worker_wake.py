"""The download loop sleeps until a task completes, not until its next poll."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from app.worker import BackgroundWorker
from tests.api.test_webhooks import build_stack, hook
from tests.conftest import make_settings
from tests.helpers import dumps, task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_completed_task_wakes_the_download_loop(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """With a 10-minute poll, the image is still claimed right after the completion commits."""
    settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    stack = await build_stack(service_factory, settings)
    worker = BackgroundWorker(stack.service.runtime, download_poll_seconds=600)
    await worker.start()
    try:
        task = await stack.submit()
        await asyncio.sleep(0.5)  # the loop's first round has found nothing and sleeps
        raw = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
        assert (await stack.service.client.post(hook(task["id"]), content=raw)).status_code == 200
        for _ in range(600):
            rows = await stack.service.sql(
                "SELECT attempts FROM images WHERE task_id = :id", id=task["id"]
            )
            if rows and rows[0][0] >= 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the download was not claimed before the next poll")
    finally:
        await worker.stop()


async def test_the_worker_confirms_a_callback_an_api_process_left_due(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """An API without loops only records the request; the worker's loop confirms it."""
    stack = await build_stack(service_factory, make_settings(database_url, tmp_path))
    stack.service.runtime.confirms_in_process = False  # RUN_BACKGROUND=false
    worker = BackgroundWorker(stack.service.runtime, download_poll_seconds=600)
    await worker.start()
    try:
        task = await stack.submit()
        upstream_id = task["upstream_task_id"]
        assert (await stack.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        raw = dumps(task_body("completed", upstream_id=upstream_id))
        answer = await stack.service.client.post(hook(task["id"]), content=raw)
        assert answer.json()["outcome"] == "confirming"
        for _ in range(600):
            if (await stack.task(task["id"]))["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the worker never confirmed the callback")
        assert stack.upstream.queries[upstream_id] == 1
    finally:
        await worker.stop()
