"""The console's pages and actions under /console (never on the provider's side)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.templating import Jinja2Templates

from app import repository
from app.api.deps import TASK_ID, RuntimeDep, SessionDep, SettingsDep
from app.api.events import _SSE_HEADERS, SSE
from app.api.images import VariantQuery, serve_image
from app.api.tasks import base_url, decode_cursor
from app.console import auth, queries
from app.console.assets import STATIC_DIR, Assets
from app.console.filters import GalleryFilters, parse
from app.console.hooks import Notifications
from app.errors import NotFound, Unprocessable
from app.events.feed import decode_cursor as decode_event_cursor
from app.events.repository import EventScope
from app.events.stream import event_stream
from app.models import utcnow
from app.services import events
from app.task_view import task_view

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=STATIC_DIR.with_name("templates"))
assets = Assets()
PAGE_SIZE = 24
# Pages: no caching, no framing, scripts and styles only from here.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}
TaskPathId = Annotated[str, Path(max_length=64)]


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


def render(
    request: Request,
    template: str,
    settings: Any,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page, with the anti-forgery token its forms need and the console's headers."""
    response = HTMLResponse("")
    nonce = auth.csrf_nonce(request, response, settings)
    root = _root(request)
    page = templates.TemplateResponse(
        request,
        template,
        {
            "root": root,
            "console": f"{root}/console",
            "static": lambda name: f"{root}/console/static/{assets.url_name(name)}",
            "csrf_field": auth.CSRF_FIELD,
            "csrf_token": auth.csrf_token(settings, nonce),
            **context,
        },
        status_code=status_code,
        headers=_PAGE_HEADERS,
    )
    for key, value in response.headers.items():
        if key == "set-cookie":
            page.headers.append(key, value)
    return page


def _task_id(task_id: str) -> str:
    if not TASK_ID.fullmatch(task_id):
        raise NotFound(f"task {task_id[:64]!r} does not exist")
    return task_id


# -- signing in and out --------------------------------------------------------------


def _safe_next(request: Request, target: str | None) -> str:
    """Only a console path of this service: never an open redirect."""
    home = f"{_root(request)}/console"
    if not target:
        return home
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith(home) or "\\" in target:
        return home
    return target


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_form(
    request: Request,
    settings: SettingsDep,
    next_url: Annotated[str | None, Query(alias="next", max_length=500)] = None,
) -> HTMLResponse:
    """The sign-in form."""
    return render(request, "sign_in.html", settings, next_url=_safe_next(request, next_url))


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(
    request: Request,
    settings: SettingsDep,
    _: auth.CsrfChecked,
    token: Annotated[str, Form(max_length=1000)] = "",
    next_url: Annotated[str, Form(alias="next", max_length=500)] = "",
) -> Response:
    """Exchange an API token for a session cookie."""
    caller = auth.token_caller(settings, token.strip())
    target = _safe_next(request, next_url)
    if caller is None:
        return render(
            request,
            "sign_in.html",
            settings,
            status_code=401,
            next_url=target,
            error="That token is not one of this service's API tokens.",
        )
    response = RedirectResponse(target, status_code=303)
    auth.start_session(request, response, settings, caller)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, _: auth.CsrfChecked) -> Response:
    """End the session."""
    response = RedirectResponse(f"{_root(request)}/console/sign-in", status_code=303)
    auth.end_session(request, response)
    return response


# -- the gallery -----------------------------------------------------------------------


async def _page(
    request: Request, session: Any, filters: GalleryFilters, cursor: str | None
) -> queries.GalleryPage:
    after = decode_cursor(cursor) if cursor else None
    return await queries.gallery_page(session, filters.task_filter, after=after, limit=PAGE_SIZE)


@router.get("", response_class=HTMLResponse)
async def gallery(
    request: Request,
    who: auth.SessionRequired,
    settings: SettingsDep,
    runtime: RuntimeDep,
    session: SessionDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    """The newest tasks as thumbnails, filtered, updating live."""
    filters = parse(request.query_params)
    # Where the live stream starts: read before the page, so nothing falls between.
    start = await queries.stream_start(runtime.engine)
    page = None
    if not filters.errors:
        try:
            page = await _page(request, session, filters, cursor)
        except Unprocessable:
            filters.errors["cursor"] = "not a cursor this service issued"
    return render(
        request,
        "gallery.html",
        settings,
        status_code=422 if filters.errors else 200,
        filters=filters,
        page=page,
        stream_after=start or "",
        older=cursor is not None,
    )


@router.get("/cards", response_class=HTMLResponse)
async def cards(
    request: Request,
    who: auth.SessionRequired,
    settings: SettingsDep,
    session: SessionDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    """The next page of cards (endless scrolling); its cursor in X-Next-Cursor."""
    filters = parse(request.query_params)
    if filters.errors:
        raise NotFound("the filters are not valid", code="invalid_filters")
    page = await _page(request, session, filters, cursor)
    response = render(request, "_cards.html", settings, page=page, filters=filters)
    response.headers["X-Next-Cursor"] = page.next_cursor or ""
    return response


@router.get("/cards/{task_id}", response_class=HTMLResponse)
async def card(
    request: Request,
    task_id: TaskPathId,
    who: auth.SessionRequired,
    settings: SettingsDep,
    session: SessionDep,
) -> Response:
    """One task's card if it matches the filters (a live update), else 204."""
    filters = parse(request.query_params)
    task = await repository.get_task(session, _task_id(task_id))
    if task is None or filters.errors:
        return Response(status_code=204)
    # The filter itself decides: the same query, narrowed to this one task.
    narrowed = dataclasses.replace(filters.task_filter, task_id=task.id)
    matched = await queries.gallery_page(session, narrowed, after=None, limit=1)
    if not matched.tasks:
        return Response(status_code=204)
    return render(request, "_cards.html", settings, page=matched, filters=filters)


@router.get("/stream")
async def stream(
    request: Request,
    who: auth.SessionRequired,
    runtime: RuntimeDep,
    after: Annotated[str | None, Query(max_length=40)] = None,
    task: Annotated[str | None, Query(max_length=64)] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> StreamingResponse:
    """Every task's (or one task's) events from `after` (or Last-Event-ID), as SSE."""
    position: tuple[int, int] | None
    if last_event_id:
        position = decode_event_cursor(last_event_id, "Last-Event-ID")
    else:
        position = decode_event_cursor(after) if after else None
    body = event_stream(
        runtime.engine,
        runtime.events,
        EventScope(task_id=_task_id(task) if task else None),
        after=position,
        base=base_url(request),
        heartbeat_seconds=runtime.events.heartbeat_seconds,
    )
    return StreamingResponse(body, media_type=SSE, headers=_SSE_HEADERS)


# -- one task ----------------------------------------------------------------------------


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
    task = await repository.get_task(session, _task_id(task_id))
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    connection = await session.connection()
    now = utcnow()
    requeued = await repository.requeue_failed_images(connection, task.id, now)
    await events.record_requeued(connection, task.id, requeued, now=now)
    notice = "retried" if requeued else "nothing-to-retry"
    target = f"{_root(request)}/console/tasks/{quote(task.id)}?notice={notice}"
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
    await hook.redeliver(await session.connection(), _task_id(task_id), delivery_id)
    target = f"{_root(request)}/console/tasks/{quote(task_id)}"
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
    return await serve_image(session, runtime, _task_id(task_id), 0, if_none_match, variant)


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
    return await serve_image(session, runtime, _task_id(task_id), index, if_none_match, variant)


# -- the overview --------------------------------------------------------------------------


@router.get("/overview", response_class=HTMLResponse)
async def overview_page(
    request: Request, who: auth.SessionRequired, settings: SettingsDep, session: SessionDep
) -> HTMLResponse:
    """Counts now and figures for the last 24 hours."""
    now = utcnow()
    figures = await queries.overview(await session.connection(), now)
    peak = max((count for _, count in figures.per_hour), default=0)
    return render(request, "overview.html", settings, figures=figures, now=now, peak=peak)


@router.get("/static/{name}")
async def static(name: Annotated[str, Path(max_length=100)]) -> Response:
    """A static file by its hashed name: cached for a year, never changed in place."""
    asset = assets.by_hashed.get(name)
    if asset is None:
        raise NotFound(f"no static file {name[:100]!r}")
    headers = {"Cache-Control": "public, max-age=31536000, immutable"}
    return Response(asset.body, media_type=asset.media_type, headers=headers)
