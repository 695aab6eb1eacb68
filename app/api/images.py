"""The stored image of a task, and re-queueing a failed download."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics, repository, variants
from app.api.deps import CallerDep, RuntimeDep, SessionDep, TaskIdDep
from app.api.tasks import ERRORS, load_public
from app.errors import Conflict, DomainError, NotFound, ServiceUnavailable
from app.models import Image, ImageStatus, utcnow
from app.runtime import Runtime
from app.schemas import ErrorBody, TaskPublic
from app.services import events
from app.storage import ObjectNotFoundError, StorageError

router = APIRouter(prefix="/tasks", tags=["images"])
log = structlog.get_logger(__name__)
PRESIGNED_SECONDS = 300
STORAGE_CHECK_SECONDS = 5.0
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such task, or no stored image yet"}
}


_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **NOT_FOUND,
    200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
    304: {"description": "Not modified (If-None-Match)"},
    307: {"description": "Redirect to a short-lived storage URL (IMAGE_REDIRECT=true)"},
}


VariantName = Literal["thumb", "preview"]
VariantQuery = Annotated[
    VariantName | None,
    Query(
        description="A WebP copy scaled to 256 px (`thumb`) or 1024 px (`preview`) on its "
        "long side; omit for the original bytes."
    ),
]
IfNoneMatchHeader = Annotated[
    str | None,
    Header(description="An ETag (the image's sha256) already held: 304 when it still matches."),
]


@router.get("/{task_id}/image", response_class=Response, responses=_IMAGE_RESPONSES)
async def get_task_image(
    _: CallerDep,
    task_id: TaskIdDep,
    session: SessionDep,
    runtime: RuntimeDep,
    if_none_match: IfNoneMatchHeader = None,
    variant: VariantQuery = None,
) -> Response:
    """The stored bytes of the task's first image (or a WebP variant), immutable once stored."""
    return await serve_image(session, runtime, task_id, 0, if_none_match, variant)


@router.get("/{task_id}/images/{index}", response_class=Response, responses=_IMAGE_RESPONSES)
async def get_task_image_at(
    _: CallerDep,
    task_id: TaskIdDep,
    index: Annotated[int, Path(ge=0, le=15, description="The image's position, from 0.")],
    session: SessionDep,
    runtime: RuntimeDep,
    if_none_match: IfNoneMatchHeader = None,
    variant: VariantQuery = None,
) -> Response:
    """The stored bytes of one image of the task (tasks with `n` > 1 have several)."""
    return await serve_image(session, runtime, task_id, index, if_none_match, variant)


async def serve_image(
    session: AsyncSession,
    runtime: Runtime,
    task_id: str,
    index: int,
    if_none_match: str | None,
    variant: str | None = None,
) -> Response:
    """One stored image (or its variant) as a response: 304 on a matching ETag."""
    task = await repository.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    image = await repository.get_image(session, task_id, index)
    if image is None or image.status != ImageStatus.STORED or not image.key:
        if image is None and index >= max(task.n, 1):
            raise NotFound(f"task {task_id} has no image {index}", code="no_such_image")
        state = image.status if image else f"none (task is {task.status})"
        raise NotFound(
            f"the image is not stored yet (image status: {state})", code="image_not_stored"
        )
    etag = f'"{image.sha256}"' if variant is None else f'"{image.sha256}.{variant}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if if_none_match and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if variant is not None:
        # End the transaction first: a render takes seconds, and on SQLite an open
        # transaction holds the write lock every other writer waits for.
        await session.commit()
        return await _serve_variant(runtime, image, image.key, variant, headers)
    if runtime.settings.image_redirect:
        url = await runtime.storage.presigned_url(image.key, PRESIGNED_SECONDS)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    try:
        stored = await runtime.storage.open(image.key)
    except ObjectNotFoundError as exc:
        raise await _image_missing(runtime, image) from exc
    except StorageError as exc:
        raise _unavailable(image, exc) from exc
    headers["Content-Length"] = str(stored.size)
    return StreamingResponse(
        stored.chunks, media_type=image.content_type or stored.content_type, headers=headers
    )


async def _serve_variant(
    runtime: Runtime, image: Image, key: str, variant: str, headers: dict[str, str]
) -> Response:
    """A variant from storage; one that was never made (an image stored before variants
    existed, or whose rendering failed then) is made now from the original, outside
    any transaction and within the process's bound on renders."""
    try:
        stored = await runtime.storage.open(variants.variant_key(key, variant))
    except ObjectNotFoundError:
        pass
    except StorageError as exc:
        raise _unavailable(image, exc) from exc
    else:
        headers["Content-Length"] = str(stored.size)
        return StreamingResponse(stored.chunks, media_type="image/webp", headers=headers)
    try:
        made = await runtime.variant_renders.make(
            runtime.storage, key, variant, max_bytes=runtime.settings.max_image_bytes
        )
    except ObjectNotFoundError as exc:
        raise await _image_missing(runtime, image) from exc
    except StorageError as exc:
        raise _unavailable(image, exc) from exc
    except variants.VariantError as exc:
        log.warning("variant_failed", task_id=image.task_id, variant=variant, reason=str(exc))
        raise NotFound(
            f"no {variant} variant can be made of this image: {exc}", code="variant_unavailable"
        ) from exc
    return Response(made, media_type="image/webp", headers=headers)


def _unavailable(image: Image, exc: StorageError) -> ServiceUnavailable:
    log.warning("storage_unavailable", task_id=image.task_id, index=image.position, reason=str(exc))
    return ServiceUnavailable(
        "the image storage is unavailable; try again later",
        code="storage_unavailable",
        headers={"Retry-After": "5"},
    )


async def _image_missing(runtime: Runtime, image: Image) -> DomainError:
    """The error for a stored image whose object is not found.

    A storage that is gone (directory unmounted, bucket missing) also reports "not
    found": only a storage that answers its check has really lost the object, which
    is data loss, not an outage: logged as an error and counted.
    """
    try:
        await _check_storage(runtime)
    except StorageError as exc:
        return _unavailable(image, exc)
    metrics.IMAGES_MISSING.inc()
    log.error("image_missing", task_id=image.task_id, index=image.position, key=image.key)
    return NotFound(
        f"image {image.position} of task {image.task_id} was stored but is missing from "
        "the storage; this has been logged for the operators",
        code="image_missing",
    )


async def _check_storage(runtime: Runtime) -> None:
    """StorageError unless the storage answers its readiness check."""
    try:
        await asyncio.wait_for(runtime.storage.check(), STORAGE_CHECK_SECONDS)
    except TimeoutError as exc:
        raise StorageError("the storage did not answer its check") from exc


@router.post(
    "/{task_id}/image/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskPublic,
    responses={
        **ERRORS,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "No download of this task has failed"},
    },
)
async def retry_task_image(
    _: CallerDep, task_id: TaskIdDep, request: Request, session: SessionDep
) -> TaskPublic:
    """Queue the task's failed downloads again (links are renewed from StarMagic if needed)."""
    connection = await session.connection()
    now = utcnow()
    requeued = await repository.requeue_failed_images(connection, task_id, now)
    await events.record_requeued(connection, task_id, requeued, now=now)
    task = await load_public(session, task_id, request)
    if not requeued:
        shown = task.image.status if task.image else None
        raise Conflict(
            f"only a failed download can be retried (image status: {shown})",
            code="image_not_failed",
        )
    return task
