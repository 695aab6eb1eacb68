"""/tasks: the internal callers' API."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from app import repository
from app.api.deps import TASK_ID, CallerDep, ReadConnectionDep, RuntimeDep, TaskIdDep
from app.errors import NotFound, Unprocessable
from app.events.waiting import requested_wait, wait_until_settled
from app.middleware import log_on_request_line
from app.models import Image, Task, TaskStatus
from app.runtime import Runtime
from app.schemas import ErrorBody, TaskCreate, TaskPage, TaskPublic
from app.services import cancel as cancel_service
from app.services.tasks import submit_task
from app.task_view import page_json, task_fields, task_view

router = APIRouter(prefix="/tasks", tags=["tasks"])

TaskStatusName = Literal["submitting", "pending", "processing", "completed", "failed", "cancelled"]
ImageStatusName = Literal["pending", "stored", "failed"]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
    422: {"model": ErrorBody, "description": "Invalid request (field and reason)"},
}


def base_url(request: Request) -> str:
    """The origin and path prefix this request reached us at, without a trailing slash."""
    return str(request.base_url).rstrip("/")


def to_public(task: Task, images: Sequence[Image], request: Request) -> TaskPublic:
    """The API's view of a task and its images."""
    return task_view(task, images, base_url(request))


PreferHeader = Annotated[
    str | None,
    Header(
        max_length=200,
        description="`wait=N` (1 to 60 seconds): answer as soon as the task is settled, "
        "or with its state after N seconds; `Preference-Applied` confirms it.",
    ),
]


async def _answer(
    runtime: Runtime, task_id: str, request: Request, response: Response, wait: int | None
) -> TaskPublic:
    """The task now, or (with a wait preference) once settled or when the wait runs out."""

    async def read() -> TaskPublic:
        async with runtime.sessions() as session:
            return await load_public(session, task_id, request)

    if wait is None:
        return await read()
    response.headers["Preference-Applied"] = f"wait={wait}"
    response.headers["Vary"] = "Prefer"
    return await wait_until_settled(runtime.events, task_id, wait, read)


async def load_public(session: AsyncSession, task_id: str, request: Request) -> TaskPublic:
    """One task as the API shows it, read now; NotFound if there is none."""
    task = await repository.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    images = await repository.task_images(session, [task_id])
    return to_public(task, images[task_id], request)


def encode_cursor(created_at: datetime, task_id: str) -> str:
    """The opaque cursor that resumes a listing after this task."""
    raw = json.dumps([created_at.isoformat(), task_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A cursor's (created_at, id); Unprocessable naming `cursor` if it is not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(raw)
        stamp = datetime.fromisoformat(created)
        if stamp.tzinfo is None or not isinstance(task_id, str):
            raise ValueError("bad cursor")
        if not TASK_ID.fullmatch(task_id):
            raise ValueError("bad cursor")
        # In UTC here: an offset that carries the instant past year 1 or 9999 would
        # otherwise fail only when bound to the query (a 500 for a forged cursor).
        return stamp.astimezone(UTC), task_id
    except (ValueError, TypeError, OverflowError) as exc:
        details = [{"field": "cursor", "reason": "not a cursor this service issued"}]
        raise Unprocessable("cursor: not a cursor this service issued", details=details) from exc


def _utc(value: datetime | None, field: str) -> datetime | None:
    """`value` in UTC (no offset means UTC); Unprocessable naming `field` if its
    offset carries it outside the years 1 to 9999 (it could not be bound to the query)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        reason = "out of range once in UTC"
        raise Unprocessable(
            f"{field}: {reason}", details=[{"field": field, "reason": reason}]
        ) from exc


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskPublic,
    responses={
        **ERRORS,
        409: {"model": ErrorBody, "description": "Same Idempotency-Key still in flight"},
        502: {"model": ErrorBody, "description": "StarMagic refused the task"},
        503: {"model": ErrorBody, "description": "StarMagic unavailable"},
    },
)
async def create_task(
    caller: CallerDep,
    body: TaskCreate,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="Retry with the same key to get the same task, never a second one.",
        ),
    ] = None,
    prefer: PreferHeader = None,
) -> TaskPublic:
    """Submit an image generation; answers at once, or when settled with `Prefer: wait=N`.

    With `webhook_url`, the task's events (`webhook_events`, default the settled ones)
    are POSTed there, signed (Standard Webhooks) with the token's default secret.
    """
    wait = requested_wait(prefer)

    async def check_webhook_url(url: str) -> None:
        await runtime.webhooks.check_url(url, "webhook_url")

    result = await submit_task(
        runtime.engine,
        runtime.sessions,
        runtime.starmagic,
        runtime.settings,
        body,
        owner=caller,
        idempotency_key=idempotency_key,
        check_webhook_url=check_webhook_url,
    )
    if result.log_fields:
        log_on_request_line(request.scope, "submit_accepted", **result.log_fields)
    response.headers["Location"] = str(request.url_for("get_task", task_id=result.task.id))
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if wait is not None or result.replayed or result.task.status == TaskStatus.COMPLETED:
        # It may have images already, or the caller waits for them.
        return await _answer(runtime, result.task.id, request, response, wait)
    return to_public(result.task, [], request)


@router.get("", response_model=TaskPage, responses=ERRORS)
async def list_tasks(
    _: CallerDep,
    request: Request,
    db: ReadConnectionDep,
    status_filter: Annotated[
        TaskStatusName | None,
        Query(alias="status", description="Only tasks in this state.", examples=["completed"]),
    ] = None,
    image_status: Annotated[
        ImageStatusName | None,
        Query(description="Only tasks whose image is in this state.", examples=["stored"]),
    ] = None,
    created_after: Annotated[
        datetime | None,
        Query(
            description="Only tasks created at or after this instant (ISO 8601; UTC if no offset).",
            examples=["2025-05-06T00:00:00Z"],
        ),
    ] = None,
    created_before: Annotated[
        datetime | None,
        Query(
            description="Only tasks created before this instant (ISO 8601; UTC if no offset).",
            examples=["2025-05-07T00:00:00Z"],
        ),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=200, description="Tasks per page (1 to 200).", examples=[50])
    ] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=512,
            description="The `next_cursor` of the previous page; omit for the first page.",
        ),
    ] = None,
) -> Response:
    """Tasks, newest first, a page at a time (pass `next_cursor` back as `cursor`)."""
    # The page is serialised as built (`page_json`): validating each task into a
    # TaskPublic again cost more than the SQL. Its bytes are what a TaskPage gives.
    filters = repository.TaskFilter(
        status=status_filter,
        image_status=image_status,
        created_after=_utc(created_after, "created_after"),
        created_before=_utc(created_before, "created_before"),
    )
    after = decode_cursor(cursor) if cursor else None
    listed = await repository.list_tasks(db, filters, limit=limit + 1, after=after)
    page = listed[:limit]
    last = page[-1][0] if len(listed) > limit else None
    next_cursor = encode_cursor(last.created_at, last.id) if last else None
    base = base_url(request)
    items = [task_fields(task, images, base) for task, images in page]
    return Response(page_json(items, next_cursor), media_type="application/json")


@router.get(
    "/{task_id}",
    response_model=TaskPublic,
    responses={**ERRORS, 404: {"model": ErrorBody, "description": "No such task"}},
)
async def get_task(
    _: CallerDep,
    task_id: TaskIdDep,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    prefer: PreferHeader = None,
) -> TaskPublic:
    """One task, with its images once stored; `Prefer: wait=N` waits for it to settle."""
    # No request-long transaction: a wait must not hold one (SQLite's is a write lock).
    return await _answer(runtime, task_id, request, response, requested_wait(prefer))


@router.post(
    "/{task_id}/cancel",
    response_model=TaskPublic,
    responses={
        **ERRORS,
        404: {"model": ErrorBody, "description": "No such task"},
        409: {"model": ErrorBody, "description": "The task can no longer be cancelled"},
        501: {"model": ErrorBody, "description": "StarMagic does not support cancelling"},
        502: {"model": ErrorBody, "description": "StarMagic answered about another task"},
        503: {"model": ErrorBody, "description": "StarMagic unavailable"},
    },
)
async def cancel_task(
    _: CallerDep, task_id: TaskIdDep, request: Request, runtime: RuntimeDep
) -> TaskPublic:
    """Ask StarMagic to cancel a pending or processing task; `cancelled` once it confirms."""
    await cancel_service.cancel_task(runtime.sessions, runtime.starmagic, runtime.settings, task_id)
    async with runtime.sessions() as session:
        return await load_public(session, task_id, request)
