"""The console's sign-in, gallery, live stream, overview and static files under /console
(never on the provider's side)."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app import repository
from app.api.deps import RuntimeDep, SessionDep, SettingsDep
from app.api.events import SSE, SSE_HEADERS
from app.api.tasks import base_url, decode_cursor
from app.console import auth, queries, sign_outs
from app.console.filters import GalleryFilters, parse
from app.console.pages import TaskPathId, assets, checked_task_id, render, root_of
from app.errors import NotFound, Unprocessable
from app.events.feed import SHARED_TYPES
from app.events.feed import decode_cursor as decode_event_cursor
from app.events.repository import EventScope
from app.events.stream import event_stream
from app.models import utcnow

router = APIRouter(prefix="/console", include_in_schema=False)
PAGE_SIZE = 24


# -- signing in and out --------------------------------------------------------------


def _safe_next(request: Request, target: str | None) -> str:
    """Only a console path of this service: never an open redirect."""
    home = f"{root_of(request)}/console"
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
async def sign_out(request: Request, runtime: RuntimeDep, _: auth.CsrfChecked) -> Response:
    """End the session everywhere: its cookie is refused from now on, wherever it is kept."""
    ended = auth.read_session(runtime.settings, request.cookies.get(auth.SESSION_COOKIE))
    if ended is not None:
        await sign_outs.sign_out(runtime.engine, ended.id, ended.caller, ended.expires_at, utcnow())
    response = RedirectResponse(f"{root_of(request)}/console/sign-in", status_code=303)
    auth.end_session(request, response)
    return response


# -- the gallery -----------------------------------------------------------------------


async def _page(
    request: Request, session: AsyncSession, filters: GalleryFilters, cursor: str | None
) -> queries.GalleryPage:
    after = decode_cursor(cursor) if cursor else None
    db = await session.connection()
    return await queries.gallery_page(db, filters.task_filter, after=after, limit=PAGE_SIZE)


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
    task = await repository.get_task(session, checked_task_id(task_id))
    if task is None or filters.errors:
        return Response(status_code=204)
    # The filter itself decides: the same query, narrowed to this one task.
    narrowed = dataclasses.replace(filters.task_filter, task_id=task.id)
    db = await session.connection()
    matched = await queries.gallery_page(db, narrowed, after=None, limit=1)
    if not matched.tasks:
        return Response(status_code=204)
    return render(request, "_cards.html", settings, page=matched, filters=filters)


def stream_scope(who: auth.Session, task: str | None) -> EventScope:
    """Every task's events (or one task's); an endpoint's only for the token that owns it."""
    return EventScope(
        task_id=checked_task_id(task) if task else None,
        viewer=who.caller,
        shared=SHARED_TYPES,
    )


@router.get("/stream")
async def stream(
    request: Request,
    who: auth.SessionRequired,
    runtime: RuntimeDep,
    after: Annotated[str | None, Query(max_length=40)] = None,
    task: Annotated[str | None, Query(max_length=64)] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> StreamingResponse:
    """Every task's (or one task's) events from `after` (or Last-Event-ID), as SSE.

    Only while the session that opened the stream lasts: it ends once the session
    expires or ends.
    """
    position: tuple[int, int] | None
    if last_event_id:
        position = decode_event_cursor(last_event_id, "Last-Event-ID")
    else:
        position = decode_event_cursor(after) if after else None
    body = event_stream(
        runtime.engine,
        runtime.events,
        stream_scope(who, task),
        after=position,
        base=base_url(request),
        heartbeat_seconds=runtime.events.heartbeat_seconds,
        still_allowed=partial(
            auth.session_lasts, runtime, request.cookies.get(auth.SESSION_COOKIE)
        ),
    )
    return StreamingResponse(body, media_type=SSE, headers=SSE_HEADERS)


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
