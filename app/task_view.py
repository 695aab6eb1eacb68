"""The task as callers see it (GET /tasks/{id}, and every event's `data`).

Image URLs are built on a base: the request's base URL over HTTP, or "" for
the root-relative form the event log stores (made absolute when served).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app import provider_errors
from app.models import Image, ImageStatus, Task, TaskStatus
from app.schemas import ErrorInfo, ImagePublic, TaskPublic

SETTLED_IMAGE_STATES = frozenset({ImageStatus.STORED.value, ImageStatus.FAILED.value})


def image_path(task_id: str, position: int) -> str:
    """The root-relative path of a stored image (the first has the short form)."""
    if position == 0:
        return f"/tasks/{task_id}/image"
    return f"/tasks/{task_id}/images/{position}"


def is_settled(status: str, images: Sequence[Image]) -> bool:
    """Failed, cancelled, or completed with every image stored or failed."""
    if status == TaskStatus.COMPLETED:
        return bool(images) and all(image.status in SETTLED_IMAGE_STATES for image in images)
    return status in (TaskStatus.FAILED, TaskStatus.CANCELLED)


def image_view(task: Task, image: Image, base: str) -> ImagePublic:
    """One image of a task."""
    stored = image.status == ImageStatus.STORED
    return ImagePublic(
        index=image.position,
        status=image.status,
        url=base + image_path(task.id, image.position) if stored else None,
        content_type=image.content_type,
        size_bytes=image.size_bytes,
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        stored_at=image.stored_at,
        source_expires_at=image.source_expires_at,
        error=ErrorInfo(code=image.error_code, message=image.error_message or "")
        if image.error_code
        else None,
    )


def task_view(task: Task, images: Sequence[Image], base: str) -> TaskPublic:
    """A task and its images; `base` prefixes the image URLs (no trailing slash)."""
    shown = [image_view(task, image, base) for image in images]
    return TaskPublic(
        id=task.id,
        status=task.status,
        progress=task.progress,
        settled=is_settled(task.status, images),
        prompt=task.prompt,
        model=task.model,
        size=task.size,
        quality=task.quality,
        resolution=task.resolution,
        n=task.n,
        image_urls=task.image_urls,
        mask_url=task.mask_url,
        metadata=task.meta,
        upstream_task_id=task.upstream_task_id,
        can_cancel=task.can_cancel,
        usage=task.usage,
        error=ErrorInfo(
            code=task.error_code,
            message=task.error_message or "",
            retryable=provider_errors.retryable(task.error_code),
        )
        if task.error_code
        else None,
        image=shown[0] if shown else None,
        images=shown,
        created_at=task.created_at,
        updated_at=task.updated_at,
        completed_at=task.completed_at,
    )


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
