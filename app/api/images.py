"""The stored image of a task, and re-queueing a failed download."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlmodel import col

from app import repository
from app.api.deps import CallerDep, RuntimeDep, SessionDep, TaskIdDep
from app.api.tasks import ERRORS, to_public
from app.errors import Conflict, NotFound, ServiceUnavailable
from app.models import ImageStatus, Task, utcnow
from app.schemas import ErrorBody, TaskPublic
from app.storage import StorageError

router = APIRouter(prefix="/tasks", tags=["images"])
PRESIGNED_SECONDS = 300
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such task, or no stored image yet"}
}


@router.get(
    "/{task_id}/image",
    response_class=Response,
    responses={
        **ERRORS,
        **NOT_FOUND,
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        304: {"description": "Not modified (If-None-Match)"},
        307: {"description": "Redirect to a short-lived storage URL (IMAGE_REDIRECT=true)"},
    },
)
async def get_task_image(
    _: CallerDep,
    task_id: TaskIdDep,
    session: SessionDep,
    runtime: RuntimeDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The stored image bytes, immutable once stored."""
    task = await repository.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    if task.image_status != ImageStatus.STORED or not task.image_key:
        state = task.image_status or f"none (task is {task.status})"
        raise NotFound(
            f"the image is not stored yet (image status: {state})", code="image_not_stored"
        )
    etag = f'"{task.image_sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if if_none_match and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if runtime.settings.image_redirect:
        url = await runtime.storage.presigned_url(task.image_key, PRESIGNED_SECONDS)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    try:
        stored = await runtime.storage.open(task.image_key)
    except StorageError as exc:
        # The row says stored, so a missing object means the storage is unwell.
        raise ServiceUnavailable(
            "the image storage is unavailable; try again later", code="storage_unavailable"
        ) from exc
    headers["Content-Length"] = str(stored.size)
    return StreamingResponse(
        stored.chunks, media_type=task.image_content_type or stored.content_type, headers=headers
    )


@router.post(
    "/{task_id}/image/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskPublic,
    responses={
        **ERRORS,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "The download has not failed"},
    },
)
async def retry_task_image(
    _: CallerDep, task_id: TaskIdDep, request: Request, session: SessionDep
) -> TaskPublic:
    """Queue a failed download again (the link is renewed from StarMagic if needed)."""
    now = utcnow()
    requeued = await repository.update_task_where(
        session,
        task_id,
        col(Task.image_status) == ImageStatus.FAILED.value,
        {
            "image_status": ImageStatus.PENDING.value,
            "image_attempts": 0,
            "image_renewed": False,
            "image_next_attempt_at": now,
            "image_error_code": None,
            "image_error_message": None,
            "updated_at": now,
        },
    )
    task = await repository.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    if not requeued:
        raise Conflict(
            f"only a failed download can be retried (image status: {task.image_status})",
            code="image_not_failed",
        )
    return to_public(task, request)
