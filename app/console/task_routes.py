"""One task in the console: its page, its actions, and its images for the browser."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from app import repository
from app.api.deps import TASK_ID, RuntimeDep, SessionDep, SettingsDep
from app.api.images import VariantQuery, serve_image
from app.api.tasks import base_url
from app.console import auth, queries
from app.console.hooks import Notifications
from app.console.pages import TaskPathId, checked_task_id, render, root_of
from app.errors import NotFound
from app.models import utcnow
from app.services import events
from app.task_view import task_view

router = APIRouter(prefix="/console", include_in_schema=False)


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
async def task_page(
    request: Request,
    task_id: TaskPathId,
    who: auth.SessionRequired,
    settings: SettingsDep,
    runtime: RuntimeDep,
    session: SessionDep,
    notice: Annotated[str | None, Query(max_length=40)] = None,
) -> HTMLResponse:
    """One task: what was asked, what it became, and everything that happened to it."""
    start = await queries.stream_start(runtime.engine)
    task = await repository.get_task(session, task_id) if TASK_ID.fullmatch(task_id) else None
    if task is None:
        return render(
            request,
            "error.html",
            settings,
            status_code=404,
            title="No such task",
            message=f"There is no task {task_id[:64]!r}.",
        )
    images = (await repository.task_images(session, [task.id]))[task.id]
    db = await session.connection()
    entries = await queries.timeline(db, task, images)
    hook: Notifications | None = getattr(request.app.state, "console_notifications", None)
    notifications = await hook.for_task(db, task.id) if hook is not None else None
    if notifications:
        entries = sorted(
            entries
            + [
                queries.Entry(
                    n.at, "Notification to the caller", n.summary, "bad" if n.failed else "info"
                )
                for n in notifications
            ],
            key=lambda entry: entry.at,
        )
    view = task_view(task, images, base_url(request))
    api_url = f"{base_url(request)}/tasks/{quote(task.id)}"
    return render(
        request,
        "task.html",
        settings,
        task=task,
        view=view,
        images=images,
        entries=entries,
        curl=f'curl -H "Authorization: Bearer $IMAGETASKS_TOKEN" {api_url}',
        notice=_NOTICES.get(notice or ""),
        stream_after=start or "",
        notifications=notifications,
    )


_NOTICES = {
    "retried": "The failed download was queued again.",
    "nothing-to-retry": "No download of this task has failed: nothing was queued.",
}


@router.post("/tasks/{task_id}/retry")
async def retry_download(
    request: Request,
    task_id: TaskPathId,
    who: auth.SessionRequired,
    _: auth.CsrfChecked,
    session: SessionDep,
) -> Response:
    """Queue the task's failed downloads again (as POST /tasks/{id}/image/retry does)."""
    task = await repository.get_task(session, checked_task_id(task_id))
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    connection = await session.connection()
    now = utcnow()
    requeued = await repository.requeue_failed_images(connection, task.id, now)
    await events.record_requeued(connection, task.id, requeued, now=now)
    notice = "retried" if requeued else "nothing-to-retry"
    target = f"{root_of(request)}/console/tasks/{quote(task.id)}?notice={notice}"
    return RedirectResponse(target, status_code=303)


@router.post("/tasks/{task_id}/notifications/{delivery_id}/redeliver")
async def redeliver(
    request: Request,
    task_id: TaskPathId,
    delivery_id: Annotated[str, Path(max_length=64)],
    who: auth.SessionRequired,
    _: auth.CsrfChecked,
    session: SessionDep,
) -> Response:
    """Send a notification to its caller again, where notifications are kept (a hook)."""
    hook: Notifications | None = getattr(request.app.state, "console_notifications", None)
    if hook is None:
        raise NotFound("this service keeps no notifications to callers", code="no_notifications")
    await hook.redeliver(await session.connection(), checked_task_id(task_id), delivery_id)
    target = f"{root_of(request)}/console/tasks/{quote(task_id)}"
    return RedirectResponse(target, status_code=303)


@router.get("/tasks/{task_id}/image")
async def image(
    task_id: TaskPathId,
    who: auth.SessionRequired,
    session: SessionDep,
    runtime: RuntimeDep,
    variant: VariantQuery = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The task's first image (or a variant), for a signed-in operator."""
    return await serve_image(session, runtime, checked_task_id(task_id), 0, if_none_match, variant)


@router.get("/tasks/{task_id}/images/{index}")
async def image_at(
    task_id: TaskPathId,
    index: Annotated[int, Path(ge=0, le=15)],
    who: auth.SessionRequired,
    session: SessionDep,
    runtime: RuntimeDep,
    variant: VariantQuery = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """One image of the task (or a variant), for a signed-in operator."""
    return await serve_image(
        session, runtime, checked_task_id(task_id), index, if_none_match, variant
    )
