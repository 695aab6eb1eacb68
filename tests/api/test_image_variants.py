"""GET /tasks/{id}/image?variant=…: WebP variants with their own ETag, made on demand."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage

from app.variants import variant_key
from tests.conftest import Service, make_settings
from tests.console.helpers import png, stored_task
from tests.factories import make_image, make_task
from tests.helpers import simulator_transport
from tests.storage.conftest import S3Server, s3_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _service(service_factory: Any, url: str, tmp_path: Path) -> Service:
    built: Service = await service_factory(make_settings(url, tmp_path), simulator_transport()[0])
    return built


async def test_a_variant_is_webp_with_its_own_etag_and_immutable(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Made on first request for an image stored without one, then served from storage."""
    service = await _service(service_factory, database_url, tmp_path)
    original = png(2000, 1000)
    task = await stored_task(service, tmp_path, original)
    key = f"{task.created_at:%Y/%m/%d}/{task.id}.png"
    assert not await service.runtime.storage.exists(variant_key(key, "thumb"))
    first = await service.client.get(f"/tasks/{task.id}/image?variant=thumb")
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/webp"
    assert "immutable" in first.headers["cache-control"]
    with PILImage.open(io.BytesIO(first.content)) as image:
        assert (image.format, image.size) == ("WEBP", (256, 128))
    assert await service.runtime.storage.exists(variant_key(key, "thumb"))
    again = await service.client.get(f"/tasks/{task.id}/images/0?variant=thumb")
    assert again.content == first.content
    etag = first.headers["etag"]
    whole = await service.client.get(f"/tasks/{task.id}/image")
    assert whole.content == original
    assert whole.headers["etag"] != etag
    cached = await service.client.get(
        f"/tasks/{task.id}/image?variant=thumb", headers={"If-None-Match": etag}
    )
    assert cached.status_code == 304
    preview = await service.client.get(f"/tasks/{task.id}/image?variant=preview")
    with PILImage.open(io.BytesIO(preview.content)) as image:
        assert image.size == (1024, 512)


async def test_an_unknown_variant_is_refused_naming_it(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """422 naming `variant`; nothing is written."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path)
    response = await service.client.get(f"/tasks/{task.id}/image?variant=huge")
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("variant:")
    key = f"{task.created_at:%Y/%m/%d}/{task.id}.png"
    assert not await service.runtime.storage.exists(variant_key(key, "thumb"))


async def test_no_variant_without_a_stored_image_or_a_readable_one(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """404 image_not_stored while pending; 404 variant_unavailable for unreadable bytes."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with service.runtime.sessions() as session:
        pending = await make_task(session, status="completed", image_status="pending")
        await make_image(session, pending.id)
    response = await service.client.get(f"/tasks/{pending.id}/image?variant=thumb")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "image_not_stored"
    broken = await stored_task(service, tmp_path, b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    response = await service.client.get(f"/tasks/{broken.id}/image?variant=preview")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "variant_unavailable"


async def test_variants_on_s3_are_made_stored_and_served(
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    s3_server: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same on an S3 bucket: made from the original there, stored beside it, served
    (never redirected: a variant is small), the original untouched."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    settings = make_settings(
        sqlite_url, tmp_path, storage_url="s3://imagetasks-test/variants", image_redirect=True
    )
    service: Service = await service_factory(settings, simulator_transport()[0])
    original = png(800, 1200)
    task = await stored_task(service, tmp_path, original)
    response = await service.client.get(f"/tasks/{task.id}/image?variant=preview")
    assert response.status_code == 200
    with PILImage.open(io.BytesIO(response.content)) as image:
        assert image.size == (683, 1024)
    key = f"{task.created_at:%Y/%m/%d}/{task.id}.png"
    assert await service.runtime.storage.exists(variant_key(key, "preview"))
    stored = await service.runtime.storage.open(key)
    assert b"".join([chunk async for chunk in stored.chunks]) == original


async def test_a_variant_that_cannot_be_spooled_is_a_storage_outage(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The original's local copy cannot be written (the spool is unusable): 503
    storage_unavailable with Retry-After, as any storage trouble, not a 500."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path, png(600, 300))
    spool = service.runtime.storage.spool_dir
    for entry in spool.iterdir():
        entry.unlink()
    spool.rmdir()
    spool.write_bytes(b"not a directory")  # every write under it fails
    response = await service.client.get(f"/tasks/{task.id}/image?variant=thumb")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert response.headers["retry-after"] == "5"
