"""Shared steps of the console's in-process tests: a service, a signed-in client,
and rows with a real image in storage."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import httpx
from PIL import Image as PILImage

from app.models import Task, utcnow
from tests.conftest import API_TOKEN, Service
from tests.factories import make_image, make_task

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def png(width: int = 640, height: int = 400, color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    """A real PNG of the given size."""
    out = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def csrf_from(html: str) -> str:
    """The anti-forgery token a rendered page put in its forms."""
    match = CSRF.search(html)
    assert match is not None, "the page has no form token"
    return match.group(1)


def console_client(service: Service) -> httpx.AsyncClient:
    """A browser-like client: no bearer token, cookies kept, HTML accepted."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app),
        base_url="https://imagetasks.test",
        headers={"Accept": "text/html"},
    )


async def sign_in(client: httpx.AsyncClient, token: str = API_TOKEN) -> httpx.Response:
    """Open the sign-in form and submit it with its token; the POST's response."""
    form = await client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    return await client.post(
        "/console/sign-in", data={"token": token, "csrf_token": csrf_from(form.text)}
    )


async def stored_task(
    service: Service, tmp_path: Path, data: bytes | None = None, **fields: Any
) -> Task:
    """A completed task whose (real PNG) image is in the service's storage."""
    data = data or png()
    source = tmp_path / "upload.png"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    async with service.runtime.sessions() as session:
        task = await make_task(
            session, status="completed", completed_at=utcnow(), image_status="stored", **fields
        )
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
            size_bytes=len(data),
            width=640,
            height=400,
            stored_at=utcnow(),
        )
    return task
