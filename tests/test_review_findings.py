"""Defects found by attacking the provider shapes, images table, downloads,
cancellation and submit classification. Each test is xfail(strict) until fixed."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from PIL import Image as PILImage

from app.callback_urls import sign
from app.db import create_engine
from app.fetch_errors import status_error
from app.images import PNG, SNIFF_BYTES, TAIL_BYTES, EndMarker, looks_complete
from app.models import utcnow
from app.schemas import Snapshot
from app.services.snapshots import image_rows
from app.upstream import LINK_LIFETIME, parse_snapshot
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.helpers import alembic_config, task_body

ASYNC = pytest.mark.asyncio(loop_scope="session")

UPSTREAM_ID = "task-unified-1757156493-review01"


async def _old_schema_rows(url: str) -> None:
    """Tasks as revision 0001 stored them: a stored, a failed and a pending image."""
    now = datetime.now(UTC).replace(tzinfo=None)
    engine = create_engine(url)
    common = (
        "INSERT INTO tasks (id, status, progress, prompt, model, owner, upstream_task_id, "
        "submit_outcome_unknown, created_at, updated_at, completed_at, poll_attempts, "
        "image_status, image_source_url, image_renewed, image_attempts, image_key, "
        "image_next_attempt_at) VALUES (:id, 'completed', 100, 'p', 'gpt-image-1.5', 'c', :up, "
        "false, :now, :now, :now, 0, :status, :src, false, 1, :key, :next)"
    )
    rows = [
        {"id": "tsk_stored", "up": "up-1", "status": "stored", "src": None, "key": "k.png"},
        {"id": "tsk_failed", "up": "up-2", "status": "failed", "src": None, "key": None},
        {"id": "tsk_pending", "up": "up-3", "status": "pending", "src": "https://x/y.png"},
    ]
    async with engine.begin() as db:
        for row in rows:
            await db.execute(sa.text(common), {"key": None, **row, "now": now, "next": now})
        await db.execute(
            sa.text(
                "INSERT INTO callback_deliveries (task_id, body_sha256, upstream_status, "
                "outcome, changed, received_at) VALUES ('tsk_stored', :h, 'completed', "
                "'applied', true, :now)"
            ),
            {"h": "b" * 64, "now": now},
        )
    await engine.dispose()


async def _count_images(url: str) -> int:
    engine = create_engine(url)
    async with engine.connect() as db:
        count = (await db.execute(sa.text("SELECT count(*) FROM images"))).scalar_one()
    await engine.dispose()
    return int(count)


@ASYNC
async def test_sqlite_upgrade_moves_existing_images(tmp_path: Path) -> None:
    """Upgrading a SQLite database that already holds tasks with images must not fail."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    config = alembic_config(url)
    await _in_thread(command.upgrade, config, "0001")
    await _old_schema_rows(url)
    await _in_thread(command.upgrade, config, "head")
    assert await _count_images(url) == 3


async def _in_thread(function: Any, *args: Any) -> None:
    import anyio.to_thread

    await anyio.to_thread.run_sync(function, *args)


def test_huge_credits_reserved_is_dropped() -> None:
    """A credits_reserved too large for a float is ignored, not an unhandled OverflowError."""
    snapshot = parse_snapshot(
        {"id": UPSTREAM_ID, "status": "pending", "usage": {"credits_reserved": 10**400}}
    )
    assert snapshot.usage is None


@ASYNC
async def test_submit_answer_with_huge_credits_is_accepted(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The provider accepted (and billed) the task: the caller gets it, not a server error."""
    body = json.dumps(
        {"id": UPSTREAM_ID, "status": "pending", "usage": {"credits_reserved": 10**400}}
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    service = await service_factory(
        make_settings(sqlite_url, tmp_path), httpx.MockTransport(handler)
    )
    response = await service.client.post("/tasks", json={"prompt": "a cat"})
    assert response.status_code == 202, response.text
    assert response.json()["upstream_task_id"] == UPSTREAM_ID


@ASYNC
async def test_unavailable_submit_keeps_key_of_a_task_that_exists(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """The key is released only while the task is still unsubmitted as far as we know."""
    submitted: list[str] = []
    holder: dict[str, Any] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        callback = json.loads(request.content)["callback_url"]
        task_id = callback.rstrip("/").split("/")[-2]
        if task_id not in submitted:
            submitted.append(task_id)
            # The provider created the task and says so before its gateway answers 503.
            hook = f"/webhooks/starmagic/{task_id}/{sign(task_id, WEBHOOK_SECRET)}"
            answer = await holder["client"].post(
                hook, json=task_body("processing", upstream_id=f"up-{task_id[-8:]}", url=None)
            )
            assert answer.status_code < 300, answer.text
        return httpx.Response(503, json={"error": {"code": "busy", "message": "later"}})

    service = await service_factory(
        make_settings(database_url, tmp_path), httpx.MockTransport(handler)
    )
    holder["client"] = service.client
    headers = {"Idempotency-Key": "review-key-1"}
    first = await service.client.post("/tasks", json={"prompt": "a cat"}, headers=headers)
    retry = await service.client.post("/tasks", json={"prompt": "a cat"}, headers=headers)
    assert first.status_code == 503, first.text
    assert len(submitted) == 1, f"submitted {len(submitted)} tasks; retry answered {retry.text}"


@ASYNC
async def test_completed_without_links_queues_every_requested_image(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """A task asking for n images gets n download entries, links or not."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=task_body("pending", upstream_id=UPSTREAM_ID, url=None))

    settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    service = await service_factory(settings, httpx.MockTransport(handler))
    created = await service.client.post(
        "/tasks", json={"prompt": "three cats", "model": "gpt-image-2", "n": 3}
    )
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    hook = f"/webhooks/starmagic/{task_id}/{sign(task_id, WEBHOOK_SECRET)}"
    done = await service.client.post(
        hook, json=task_body("completed", upstream_id=UPSTREAM_ID, url=None, published=True)
    )
    assert done.status_code < 300, done.text
    rows = await service.sql("SELECT position FROM images WHERE task_id = :id", id=task_id)
    assert sorted(row[0] for row in rows) == [0, 1, 2]


def _completed(expires_at: datetime) -> Snapshot:
    return parse_snapshot(
        {
            "code": 200,
            "data": {
                "id": UPSTREAM_ID,
                "status": "completed",
                "result": {
                    "images": [
                        {"url": "https://cdn.example/a.png", "expires_at": expires_at.timestamp()}
                    ]
                },
            },
        }
    )


def test_far_future_expiry_is_capped_at_the_link_lifetime() -> None:
    """No link outlives the published 24 hours, whatever expires_at claims."""
    now = utcnow()
    snapshot = _completed(datetime(2200, 1, 1, tzinfo=UTC))
    [row] = image_rows("tsk_x", snapshot, now)
    assert row["source_expires_at"] <= now + LINK_LIFETIME


def test_past_expiry_still_gets_a_fetch() -> None:
    """An expiry already past when the link arrives is not trusted over the 24 h rule."""
    now = utcnow()
    snapshot = _completed(now - timedelta(minutes=5))
    [row] = image_rows("tsk_x", snapshot, now)
    assert row["source_expires_at"] > now


@ASYNC
async def test_cancel_answer_about_another_task_is_an_error(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """StarMagic confirming the cancel of a different task is a bad gateway, not success."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(
                200,
                json={
                    "id": "task-unified-other",
                    "object": "task.cancelled",
                    "status": "cancelled",
                },
            )
        body = task_body("pending", upstream_id=UPSTREAM_ID, url=None, published=True)
        body["task_info"] = {"can_cancel": True}
        return httpx.Response(200, json=body)

    service = await service_factory(
        make_settings(database_url, tmp_path), httpx.MockTransport(handler)
    )
    created = await service.client.post("/tasks", json={"prompt": "a cat"})
    assert created.status_code == 202, created.text
    answer = await service.client.post(f"/tasks/{created.json()['id']}/cancel")
    assert answer.status_code == 502, answer.text


def test_odd_retry_after_does_not_hide_the_status() -> None:
    """A malformed Retry-After is ignored; the answer's status still decides."""
    # As it arrives off the wire: raw bytes, decoded by httpx.
    error = status_error(httpx.Response(404, headers=[(b"retry-after", "²".encode())]))
    assert error.renew_link
    assert error.retry_after is None


@ASYNC
async def test_links_beyond_n_are_not_downloaded(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """A task that asked for one image stores one, however many links come back."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=task_body("pending", upstream_id=UPSTREAM_ID, url=None))

    settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    service = await service_factory(settings, httpx.MockTransport(handler))
    created = await service.client.post("/tasks", json={"prompt": "one cat"})
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    links = [f"https://cdn.example.com/{i}.png" for i in range(16)]
    hook = f"/webhooks/starmagic/{task_id}/{sign(task_id, WEBHOOK_SECRET)}"
    done = await service.client.post(
        hook, json=task_body("completed", upstream_id=UPSTREAM_ID, urls=links, published=True)
    )
    assert done.status_code < 300, done.text
    rows = await service.sql("SELECT position FROM images WHERE task_id = :id", id=task_id)
    assert [row[0] for row in rows] == [0]


def _png(width: int, height: int, pixels: bytes | None = None) -> bytes:
    image = (
        PILImage.frombytes("RGB", (width, height), pixels)
        if pixels
        else PILImage.new("RGB", (width, height), "red")
    )
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def test_png_with_embedded_png_cut_short_is_truncated() -> None:
    """Only the PNG's own closing IEND chunk makes a body complete."""
    main = _png(64, 64, random.Random(7).randbytes(64 * 64 * 3))
    after_ihdr = 8 + 25  # the signature, then the IHDR chunk
    whole = main[:after_ihdr] + _chunk(b"caBX", _png(4, 4)) + main[after_ihdr:]
    cut = whole[: len(whole) // 2]
    end = EndMarker()
    end.feed(cut)
    assert not looks_complete(PNG, cut[:SNIFF_BYTES], cut[-TAIL_BYTES:], len(cut), end.seen)


def test_unusable_result_entry_keeps_the_positions() -> None:
    """Each link keeps the provider's position, so renewals fetch the same image again."""
    snapshot = parse_snapshot(
        {
            "id": UPSTREAM_ID,
            "status": "completed",
            "results": ["https://cdn.example.com/0.png", None, "https://cdn.example.com/2.png"],
        }
    )
    assert [image.url for image in snapshot.images][2:] == ["https://cdn.example.com/2.png"]
