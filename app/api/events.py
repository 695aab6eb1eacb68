"""/events and /tasks/{id}/events: the event log, as a feed and as a live stream."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app import repository
from app.api.deps import CallerDep, RuntimeDep, TaskIdDep
from app.api.tasks import ERRORS, base_url
from app.errors import NotFound
from app.events.feed import SHARED_TYPES, decode_cursor, parse_types, read_page
from app.events.repository import EventScope
from app.events.schemas import EventPage
from app.events.stream import event_stream
from app.runtime import Runtime
from app.schemas import ErrorBody
from app.webhooks import repository as webhook_repository
from app.webhooks.schemas import AttemptPublic, DeliveryPublic, TaskEvent, TaskEventPage

router = APIRouter(tags=["events"])

SSE = "text/event-stream"
_SSE_EXAMPLE = 'id: 7319.42\nevent: image.stored\ndata: {"id": "evt_…", …}\n\n'
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "content": {
            SSE: {"example": 'id: 7319.42\nevent: image.stored\ndata: {"id": "evt_…"}\n\n'}
        },
        "description": "Server-Sent Events: `id` (resume cursor), `event` (type), `data` "
        "(the event as JSON); a `: heartbeat` comment every 15 s.",
    },
}

AfterQuery = Annotated[
    str | None, Query(max_length=40, description="A `next_cursor` (or SSE `id`) already seen.")
]
TypesQuery = Annotated[
    str | None,
    Query(max_length=200, description="Comma-separated event types to keep (default: all)."),
]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="Events per page (1 to 500).")]
ScopeQuery = Annotated[
    Literal["mine", "all"],
    Query(
        description="`mine`: events of tasks this token created; `all`: every task's "
        "(endpoint events only ever to their own token)."
    ),
]
LastEventId = Annotated[
    str | None,
    Header(
        max_length=40,
        description="The `id` of the last message received: the stream resumes after it.",
    ),
]


def _scope(caller: str, scope: str, types: str | None, task_id: str | None = None) -> EventScope:
    owner = caller if scope == "mine" and task_id is None else None
    return EventScope(
        owner=owner,
        task_id=task_id,
        types=parse_types(types),
        viewer=caller,
        shared=SHARED_TYPES,
    )


def _stream(
    runtime: Runtime,
    request: Request,
    scope: EventScope,
    after: str | None,
    last_event_id: str | None,
) -> StreamingResponse:
    """The stream from Last-Event-ID (a reconnect) or else `after`; 422 naming the bad one."""
    if last_event_id:
        position: tuple[int, int] | None = decode_cursor(last_event_id, "Last-Event-ID")
    else:
        position = decode_cursor(after) if after else None
    body = event_stream(
        runtime.engine,
        runtime.events,
        scope,
        after=position,
        base=base_url(request),
        heartbeat_seconds=runtime.events.heartbeat_seconds,
    )
    return StreamingResponse(body, media_type=SSE, headers=SSE_HEADERS)


async def _page(
    runtime: Runtime, request: Request, scope: EventScope, after: str | None, limit: int
) -> EventPage:
    page = await read_page(
        runtime.engine,
        scope,
        after=decode_cursor(after) if after else None,
        limit=limit,
        base=base_url(request),
    )
    return EventPage(items=page.items, next_cursor=page.next_cursor, has_more=page.has_more)


@router.get("/events", response_model=EventPage, responses=ERRORS)
async def list_events(
    caller: CallerDep,
    request: Request,
    runtime: RuntimeDep,
    after: AfterQuery = None,
    types: TypesQuery = None,
    limit: LimitQuery = 100,
    scope: ScopeQuery = "mine",
) -> EventPage:
    """The event log in order, a page at a time: pass `next_cursor` back as `after`."""
    return await _page(runtime, request, _scope(caller, scope, types), after, limit)


@router.get("/events/stream", response_class=StreamingResponse, responses=_STREAM_RESPONSES)
async def stream_events(
    caller: CallerDep,
    request: Request,
    runtime: RuntimeDep,
    after: AfterQuery = None,
    types: TypesQuery = None,
    scope: ScopeQuery = "mine",
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    """The events as they happen (Server-Sent Events), resumable with Last-Event-ID."""
    return _stream(runtime, request, _scope(caller, scope, types), after, last_event_id)


async def _with_deliveries(runtime: Runtime, page: EventPage, caller: str) -> TaskEventPage:
    """The page's events, each with the caller's webhook deliveries of it."""
    async with runtime.engine.connect() as db:
        found = await webhook_repository.deliveries_of(
            db, [event.id for event in page.items], caller
        )
    items = [
        TaskEvent(
            **event.model_dump(),
            deliveries=[
                DeliveryPublic(
                    endpoint_id=None
                    if row.target == webhook_repository.TASK_TARGET
                    else row.target,
                    status=row.status,
                    next_attempt_at=row.next_attempt_at,
                    delivered_at=row.delivered_at,
                    attempts=[
                        AttemptPublic(
                            attempted_at=attempt.attempted_at,
                            status_code=attempt.status_code,
                            duration_ms=attempt.duration_ms,
                            error=attempt.error,
                        )
                        for attempt in attempts
                    ],
                )
                for row, attempts in found.get(event.id, [])
            ],
        )
        for event in page.items
    ]
    return TaskEventPage(items=items, next_cursor=page.next_cursor, has_more=page.has_more)


@router.get(
    "/tasks/{task_id}/events",
    response_model=TaskEventPage,
    responses={
        **_STREAM_RESPONSES,
        200: {
            "model": TaskEventPage,
            "content": {SSE: _STREAM_RESPONSES[200]["content"][SSE]},
            "description": "The task's events, oldest first, each with its webhook "
            "deliveries (this token's) and every attempt; a live stream with "
            "`Accept: text/event-stream`.",
        },
        404: {"model": ErrorBody, "description": "No such task"},
    },
)
async def task_events(
    caller: CallerDep,
    task_id: TaskIdDep,
    request: Request,
    runtime: RuntimeDep,
    after: AfterQuery = None,
    types: TypesQuery = None,
    limit: LimitQuery = 100,
    accept: Annotated[
        str | None,
        Header(description="`text/event-stream` for the live stream instead of a page."),
    ] = None,
    last_event_id: LastEventId = None,
) -> TaskEventPage | StreamingResponse:
    """One task's story, oldest first, with webhook deliveries (or live, with
    `Accept: text/event-stream`)."""
    scope = _scope(caller, "all", types, task_id)
    async with runtime.sessions() as session:
        if await repository.task_state(await session.connection(), task_id) is None:
            raise NotFound(f"task {task_id} does not exist")
    if accept and SSE in accept:
        return _stream(runtime, request, scope, after, last_event_id)
    page = await _page(runtime, request, scope, after, limit)
    return await _with_deliveries(runtime, page, caller)
