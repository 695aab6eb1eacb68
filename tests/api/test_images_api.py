"""GET /tasks/{id}/image and re-queueing failed downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlmodel import col

from app.models import Image, Task, utcnow
from tests.conftest import LogLines, Service, make_settings
from tests.factories import make_image, make_task
from tests.helpers import simulator_transport
from tests.ports import free_port
from tests.storage.conftest import S3Server, s3_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.asyncio(loop_scope="session")

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


async def stored_task(service: Service, tmp_path: Path) -> Task:
    """A completed task whose image is in the service's storage."""
    source = tmp_path / "upload.png"
    source.write_bytes(IMAGE)
    digest = hashlib.sha256(IMAGE).hexdigest()
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed", completed_at=utcnow())
    key = f"{task.created_at:%Y/%m/%d}/{task.id}.png"
    await service.runtime.storage.put_file(key, source, content_type="image/png", sha256=digest)
    async with service.runtime.sessions() as session:
        await make_image(
            session,
            task.id,
            status="stored",
            key=key,
            sha256=digest,
            content_type="image/png",
            size_bytes=len(IMAGE),
            stored_at=utcnow(),
        )
    await set_columns(service, task.id, image_status="stored")
    return task


async def set_columns(service: Service, task_id: str, **values: Any) -> None:
    async with service.runtime.sessions() as session, session.begin():
        await session.execute(update(Task).where(col(Task.id) == task_id).values(**values))


async def set_image(service: Service, task_id: str, **values: Any) -> None:
    async with service.runtime.sessions() as session, session.begin():
        await session.execute(update(Image).where(col(Image.task_id) == task_id).values(**values))


async def test_the_stored_image_is_served_with_cache_headers(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Exact bytes, its type, an ETag from the sha256, immutable; 304 on If-None-Match."""
    service: Service = await service_factory(
        make_settings(database_url, tmp_path), simulator_transport()[0]
    )
    task = await stored_task(service, tmp_path)
    response = await service.client.get(f"/tasks/{task.id}/image")
    assert response.status_code == 200
    assert response.content == IMAGE
    assert response.headers["content-type"] == "image/png"
    etag = f'"{hashlib.sha256(IMAGE).hexdigest()}"'
    assert response.headers["etag"] == etag
    assert "immutable" in response.headers["cache-control"]
    cached = await service.client.get(f"/tasks/{task.id}/image", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    shown = (await service.client.get(f"/tasks/{task.id}")).json()["image"]
    assert shown["url"] == f"https://imagetasks.test/tasks/{task.id}/image"


async def test_no_image_until_stored(service_factory: Any, sqlite_url: str, tmp_path: Path) -> None:
    """Pending or failed downloads and unknown tasks are 404 in the error shape."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed", image_status="pending")
        await make_image(session, task.id)
    pending = await service.client.get(f"/tasks/{task.id}/image")
    assert pending.status_code == 404
    assert pending.json()["error"]["code"] == "image_not_stored"
    assert (await service.client.get("/tasks/tsk_nope/image")).status_code == 404


async def test_only_failed_downloads_can_be_requeued(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """409 while pending; a failed one is queued again with its error cleared."""
    service: Service = await service_factory(
        make_settings(database_url, tmp_path), simulator_transport()[0]
    )
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed", image_status="pending")
        await make_image(session, task.id)
    busy = await service.client.post(f"/tasks/{task.id}/image/retry")
    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "image_not_failed"
    await set_columns(service, task.id, image_status="failed")
    await set_image(
        service,
        task.id,
        status="failed",
        error_code="http_403",
        error_message="forbidden",
        renewed=True,
        attempts=4,
    )
    retried = await service.client.post(f"/tasks/{task.id}/image/retry")
    assert retried.status_code == 202
    assert retried.json()["image"]["status"] == "pending"
    assert retried.json()["image"]["error"] is None
    rows = await service.sql("SELECT renewed, attempts FROM images WHERE task_id = :id", id=task.id)
    assert [(bool(renewed), attempts) for renewed, attempts in rows] == [(False, 0)]
    summary = await service.sql("SELECT image_status FROM tasks WHERE id = :id", id=task.id)
    assert summary == [("pending",)]
    assert (await service.client.post("/tasks/tsk_nope/image/retry")).status_code == 404


async def test_s3_images_can_redirect_to_a_presigned_url(
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    s3_server: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With IMAGE_REDIRECT on S3, the caller is sent to a short-lived URL with the bytes."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    settings = make_settings(
        sqlite_url, tmp_path, storage_url="s3://imagetasks-test/api-test", image_redirect=True
    )
    service: Service = await service_factory(settings, simulator_transport()[0])
    task = await stored_task(service, tmp_path)
    response = await service.client.get(f"/tasks/{task.id}/image")
    assert response.status_code == 307
    location = response.headers["location"]
    assert location.startswith(s3_server.endpoint)
    assert "X-Amz-Signature" in location
    async with httpx.AsyncClient() as plain:
        fetched = await plain.get(location)
    assert fetched.content == IMAGE


async def test_an_image_gone_from_storage_is_404_image_missing_logged_and_counted(
    service_factory: Any, database_url: str, tmp_path: Path, capture_logs: LogLines
) -> None:
    """A stored image whose file was deleted is data loss: 404 image_missing, an error, a count."""
    service: Service = await service_factory(
        make_settings(database_url, tmp_path), simulator_transport()[0]
    )
    task = await stored_task(service, tmp_path)
    (tmp_path / "images" / f"{task.created_at:%Y/%m/%d}/{task.id}.png").unlink()
    before = REGISTRY.get_sample_value("imagetasks_images_missing_total") or 0.0
    response = await service.client.get(f"/tasks/{task.id}/image")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "image_missing"
    assert REGISTRY.get_sample_value("imagetasks_images_missing_total") == before + 1
    errors = [e for e in capture_logs() if e["event"] == "image_missing"]
    assert [(e["level"], e["task_id"]) for e in errors] == [("error", task.id)]


async def test_an_unreachable_storage_is_still_503(
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    s3_server: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the bucket cannot be reached at all (not a missing object), the answer stays 503."""
    for name, value in {
        **s3_server.env,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }.items():
        monkeypatch.setenv(name, value)
    settings = make_settings(sqlite_url, tmp_path, storage_url="s3://imagetasks-test/api-test")
    service: Service = await service_factory(settings, simulator_transport()[0])
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed", completed_at=utcnow())
        await make_image(session, task.id, status="stored", key="2025/01/01/x.png", sha256="0" * 64)
    await set_columns(service, task.id, image_status="stored")
    response = await service.client.get(f"/tasks/{task.id}/image")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"


async def test_a_vanished_storage_directory_is_503_not_image_missing(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The whole image directory gone (a file in its place) is an outage: 503, nothing counted."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    task = await stored_task(service, tmp_path)
    images = tmp_path / "images"
    images.rename(tmp_path / "images.away")
    images.write_text("the storage volume is gone\n")
    before = REGISTRY.get_sample_value("imagetasks_images_missing_total") or 0.0
    response = await service.client.get(f"/tasks/{task.id}/image")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert (REGISTRY.get_sample_value("imagetasks_images_missing_total") or 0.0) == before


async def test_a_variant_of_an_image_gone_from_storage_is_logged_and_counted_too(
    service_factory: Any, sqlite_url: str, tmp_path: Path, capture_logs: LogLines
) -> None:
    """?variant=thumb of a lost image is the same data loss: 404, one error line, one count."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    task = await stored_task(service, tmp_path)
    for path in (tmp_path / "images").rglob(f"{task.id}.*"):
        path.unlink()
    before = REGISTRY.get_sample_value("imagetasks_images_missing_total") or 0.0
    response = await service.client.get(f"/tasks/{task.id}/image", params={"variant": "thumb"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "image_missing"
    assert "logged for the operators" in error["message"]
    assert REGISTRY.get_sample_value("imagetasks_images_missing_total") == before + 1
    errors = [e for e in capture_logs() if e["event"] == "image_missing"]
    assert [(e["level"], e["task_id"]) for e in errors] == [("error", task.id)]


async def test_a_variant_from_a_vanished_storage_directory_is_503(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The storage volume gone: a variant request is an outage too, not a lost image."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    task = await stored_task(service, tmp_path)
    images = tmp_path / "images"
    images.rename(tmp_path / "images.away")
    images.write_text("the storage volume is gone\n")
    before = REGISTRY.get_sample_value("imagetasks_images_missing_total") or 0.0
    response = await service.client.get(f"/tasks/{task.id}/image", params={"variant": "thumb"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert (REGISTRY.get_sample_value("imagetasks_images_missing_total") or 0.0) == before
