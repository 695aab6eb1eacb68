"""The task as callers see it (GET /tasks/{id}, and every event's `data`).

Image URLs are built on a base: the request's base URL over HTTP, or "" for
the root-relative form the event log stores (made absolute when served).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from pydantic_core import to_json

from app import provider_errors
from app.models import Image, ImageStatus, Task, TaskStatus
from app.schemas import TaskPublic

SETTLED_IMAGE_STATES = frozenset({ImageStatus.STORED.value, ImageStatus.FAILED.value})


class TaskRow(NamedTuple):
    """The columns of a task that its view reads (and the console's cards, which also
    show `image_status`): a listing reads these as plain rows, not ORM objects."""

    id: str
    status: str
    progress: int
    prompt: str
    model: str
    size: str | None
    quality: str | None
    resolution: str | None
    n: int
    image_urls: list[str] | None
    mask_url: str | None
    meta: dict[str, Any]  # the column named `metadata`
    upstream_task_id: str | None
    can_cancel: bool | None
    usage: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    image_status: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class ImageRow(NamedTuple):
    """The columns of an image that its view reads."""

    position: int
    status: str
    content_type: str | None
    size_bytes: int | None
    sha256: str | None
    width: int | None
    height: int | None
    stored_at: datetime | None
    source_expires_at: datetime | None
    error_code: str | None
    error_message: str | None


ShownTask = Task | TaskRow
ShownImage = Image | ImageRow


def image_path(task_id: str, position: int) -> str:
    """The root-relative path of a stored image (the first has the short form)."""
    if position == 0:
        return f"/tasks/{task_id}/image"
    return f"/tasks/{task_id}/images/{position}"


def is_settled(status: str, images: Sequence[ShownImage]) -> bool:
    """Failed, cancelled, or completed with every image stored or failed."""
    if status == TaskStatus.COMPLETED:
        return bool(images) and all(image.status in SETTLED_IMAGE_STATES for image in images)
    return status in (TaskStatus.FAILED, TaskStatus.CANCELLED)


def image_fields(task_id: str, image: ShownImage, base: str) -> dict[str, Any]:
    """One image of a task: ImagePublic's fields, in its order."""
    stored = image.status == ImageStatus.STORED
    error = (
        {"code": image.error_code, "message": image.error_message or "", "retryable": None}
        if image.error_code
        else None
    )
    return {
        "index": image.position,
        "status": image.status,
        "url": base + image_path(task_id, image.position) if stored else None,
        "content_type": image.content_type,
        "size_bytes": image.size_bytes,
        "sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "stored_at": image.stored_at,
        "source_expires_at": image.source_expires_at,
        "error": error,
    }


def task_fields(task: ShownTask, images: Sequence[ShownImage], base: str) -> dict[str, Any]:
    """A task and its images as callers see them: TaskPublic's fields, in its order, as
    plain values; `base` prefixes the image URLs (no trailing slash).

    The one mapping: `task_view` validates it into a TaskPublic; a listing page
    serialises it as it is (`page_json`), skipping a validation per task."""
    shown = [image_fields(task.id, image, base) for image in images]
    error = (
        {
            "code": task.error_code,
            "message": task.error_message or "",
            "retryable": provider_errors.retryable(task.error_code),
        }
        if task.error_code
        else None
    )
    return {
        "id": task.id,
        "status": task.status,
        "progress": task.progress,
        "settled": is_settled(task.status, images),
        "prompt": task.prompt,
        "model": task.model,
        "size": task.size,
        "quality": task.quality,
        "resolution": task.resolution,
        "n": task.n,
        "image_urls": task.image_urls,
        "mask_url": task.mask_url,
        "metadata": task.meta,
        "upstream_task_id": task.upstream_task_id,
        "can_cancel": task.can_cancel,
        "usage": task.usage,
        "error": error,
        "image": shown[0] if shown else None,
        "images": shown,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "completed_at": task.completed_at,
    }


def task_view(task: ShownTask, images: Sequence[ShownImage], base: str) -> TaskPublic:
    """A task and its images; `base` prefixes the image URLs (no trailing slash)."""
    return TaskPublic.model_validate(task_fields(task, images, base))


def page_json(items: list[dict[str, Any]], next_cursor: str | None) -> bytes:
    """A TaskPage of `task_fields` items as JSON, byte for byte what serialising the
    validated TaskPage gives (same field order, same datetime and float forms)."""
    page = {"items": items, "next_cursor": next_cursor}
    return to_json(page, inf_nan_mode="null")


def absolute_urls(data: dict[str, Any], base: str) -> dict[str, Any]:
    """A stored task view with its root-relative image URLs made absolute on `base`."""
    images = [_absolute(image, base) for image in data.get("images") or []]
    image = data.get("image")
    return {
        **data,
        "image": _absolute(image, base) if isinstance(image, dict) else image,
        "images": images,
    }


def _absolute(image: dict[str, Any], base: str) -> dict[str, Any]:
    url = image.get("url")
    if isinstance(url, str) and url.startswith("/"):
        return {**image, "url": base + url}
    return image
