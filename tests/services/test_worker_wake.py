"""The download loop sleeps until a task completes, not until its next poll."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from app import variants
from app import worker as worker_module
from app.worker import BackgroundWorker
from tests.api.test_webhooks import build_stack, hook
from tests.conftest import make_settings
from tests.console.helpers import png
from tests.helpers import dumps, task_body
from tests.services.test_downloads import ScriptedFetcher

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


async def test_a_download_slot_is_free_once_its_image_is_stored_while_its_variants_wait(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One download slot, the first image's render held: the second image is still
    fetched and stored (its link expires; a variant is a convenience), and both get
    their variants once the render goes on."""
    settings = make_settings(
        database_url, tmp_path, confirm_callbacks=False, download_concurrency=1
    )
    stack = await build_stack(service_factory, settings)
    held, release, hold_over = threading.Event(), threading.Event(), threading.Event()
    real_render_all = variants.render_all

    def first_render_held(original: object, long_sides: list[int]) -> list[bytes]:
        if not held.is_set():
            held.set()
            release.wait(60)
            hold_over.set()
        return real_render_all(original, long_sides)  # type: ignore[arg-type]

    monkeypatch.setattr(variants, "render_all", first_render_held)
    # The provider's links are made up: the two fetches answer with real PNGs.
    fetcher = ScriptedFetcher([png(600, 300), png(300, 600)])
    monkeypatch.setattr(stack.service.runtime, "fetcher", fetcher)
    worker = BackgroundWorker(stack.service.runtime, download_poll_seconds=0.2)
    await worker.start()
    try:
        tasks = [await stack.submit() for _ in range(2)]

        async def complete(task: dict[str, Any]) -> None:
            raw = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
            answer = await stack.service.client.post(hook(task["id"]), content=raw)
            assert answer.status_code == 200

        async def stored(task: dict[str, Any]) -> bool:
            return bool((await stack.task(task["id"]))["image"]["status"] == "stored")

        await complete(tasks[0])
        await asyncio.to_thread(held.wait, 10)
        assert held.is_set(), "the first image's render never started"
        await complete(tasks[1])
        for _ in range(200):
            if await stored(tasks[1]):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the second image waited for the first one's render")
        assert not hold_over.is_set(), "the second image was stored only after the held render"
    finally:
        release.set()
        await worker.stop()
    for task in tasks:
        rows = await stack.service.sql("SELECT key FROM images WHERE task_id = :id", id=task["id"])
        assert (tmp_path / "images" / variants.variant_key(rows[0][0], "thumb")).exists()


async def test_variants_past_the_render_backlog_are_made_on_their_first_request(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the worker's renders at their bound, a stored image's variants are not
    queued without end: they are left out, logged, and made when first asked for."""
    settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    stack = await build_stack(service_factory, settings)
    monkeypatch.setattr(worker_module, "RENDER_BACKLOG", 0)  # as if the bound were reached
    monkeypatch.setattr(stack.service.runtime, "fetcher", ScriptedFetcher([png(600, 300)]))
    task, logs = await _one_image_stored(stack)
    key = await stack.service.sql("SELECT key FROM images WHERE task_id = :id", id=task["id"])
    thumb = tmp_path / "images" / variants.variant_key(key[0][0], "thumb")
    assert not thumb.exists()
    assert [line["key"] for line in logs if line["event"] == "variants_deferred"] == [key[0][0]]
    answer = await stack.service.client.get(f"/tasks/{task['id']}/image?variant=thumb")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/webp"
    assert thumb.exists()


async def test_confirmations_come_first_while_they_are_behind(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More confirmations due than one claim takes: the worker downloads one image at a
    time and leaves variants to their first request until it has caught up, then
    downloads at its full concurrency again."""
    from app.services import reconcile

    monkeypatch.setattr(reconcile, "CONFIRM_BATCH", 2)
    stack = await build_stack(service_factory, make_settings(database_url, tmp_path))
    runtime = stack.service.runtime
    runtime.confirms_in_process = False  # RUN_BACKGROUND=false: the worker confirms
    reconciler = runtime.reconciler
    tasks = [await stack.submit() for _ in range(3)]
    for task in tasks:
        assert (await stack.sim.post(f"/_sim/tasks/{task['upstream_task_id']}/complete")).is_success
        raw = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
        assert (await stack.service.client.post(hook(task["id"]), content=raw)).is_success
    assert not reconciler.behind
    assert await reconciler.start_confirmations() == 2  # a full claim: more may be due
    assert reconciler.behind
    await reconciler.wait_idle()
    worker = BackgroundWorker(runtime, download_poll_seconds=600)
    gate = asyncio.Event()

    async def held_store(job: Any) -> None:
        await gate.wait()

    monkeypatch.setattr(worker.downloader, "store", held_store)
    await worker._download_round()
    assert len(worker._running) == 1  # two images are due, one slot while behind
    assert await reconciler.start_confirmations() == 1
    assert not reconciler.behind  # the claim took all there was
    await reconciler.wait_idle()
    await worker._download_round()
    assert len(worker._running) == 3
    gate.set()
    await asyncio.gather(*worker._running)


async def test_variants_wait_for_their_first_request_while_confirmations_are_behind(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download finished while confirmations are behind renders nothing (the CPU is
    the confirmations'): its variants are made when first asked for."""
    settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    stack = await build_stack(service_factory, settings)
    monkeypatch.setattr(stack.service.runtime, "fetcher", ScriptedFetcher([png(600, 300)]))
    reconciler = stack.service.runtime.reconciler

    async def always_behind(*_: Any) -> int:
        reconciler.behind = True  # as the loop finds it with more due than it can take
        return 0

    monkeypatch.setattr(reconciler, "start_confirmations", always_behind)
    task, logs = await _one_image_stored(stack)
    key = await stack.service.sql("SELECT key FROM images WHERE task_id = :id", id=task["id"])
    assert not (tmp_path / "images" / variants.variant_key(key[0][0], "thumb")).exists()
    deferred = [line for line in logs if line["event"] == "variants_deferred"]
    assert [(line["key"], line["reason"]) for line in deferred] == [
        (key[0][0], "confirmations_behind")
    ]


async def _one_image_stored(stack: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A task submitted and completed with a worker running, once its image is stored
    and a render, were one started, has begun; the task and the log lines meanwhile."""
    worker = BackgroundWorker(stack.service.runtime, download_poll_seconds=0.2)
    await worker.start()
    try:
        with capture_logs() as logs:
            task = await stack.submit()
            raw = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
            assert (await stack.service.client.post(hook(task["id"]), content=raw)).is_success
            for _ in range(200):
                if (await stack.task(task["id"]))["image"]["status"] == "stored":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the image was never stored")
            await asyncio.sleep(0.3)
    finally:
        await worker.stop()
    return task, logs


async def test_events_that_queue_no_webhook_do_not_each_cost_an_outbox_look(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every event rings the webhook loop, and most queue nothing: with none due, a
    stream of events costs a bounded number of outbox claims, not one each."""
    from app.webhooks import outbox

    # A wide gap between looks, so that the bound below stays far under the number of
    # rings however slowly a busy machine lets them come.
    recheck = 0.1
    monkeypatch.setattr(worker_module, "WEBHOOK_RECHECK_SECONDS", recheck)
    stack = await build_stack(service_factory, make_settings(database_url, tmp_path))
    looks = 0
    claim_due = outbox.claim_due

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal looks
        looks += 1
        return await claim_due(*args, **kwargs)

    monkeypatch.setattr(outbox, "claim_due", counted)
    worker = BackgroundWorker(stack.service.runtime, download_poll_seconds=600)
    await worker.start()
    rings = 300
    try:
        await asyncio.sleep(0.1)
        before = looks
        started = asyncio.get_running_loop().time()
        for _ in range(rings):
            worker._written.ring(None)  # as an event notice does
            await asyncio.sleep(0.001)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await worker.stop()
    assert 1 <= looks - before <= elapsed / recheck + 2 < rings / 2, (looks - before, elapsed)
