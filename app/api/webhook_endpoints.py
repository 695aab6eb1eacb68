"""/webhook-endpoints and /events/{id}/redeliver: callers' standing webhook subscriptions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response, status

from app.api.deps import CallerDep, RuntimeDep
from app.api.tasks import ERRORS
from app.errors import NotFound
from app.schemas import ErrorBody
from app.webhooks.schemas import (
    EndpointCreate,
    EndpointCreated,
    EndpointList,
    EndpointPublic,
    EndpointUpdate,
    Queued,
    SecretPublic,
)

router = APIRouter(tags=["webhooks"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorBody, "description": "No such endpoint for this token"},
}
_ID_LENGTH = 64


async def endpoint_id_path(
    endpoint_id: Annotated[
        str,
        Path(description="The endpoint's id (`we_…`).", examples=["we_01JDZ6T5Q8M2W3X4Y5Z6A7B8C9"]),
    ],
) -> str:
    """An endpoint id from the path; an impossible one is 404 before any SQL."""
    if len(endpoint_id) > _ID_LENGTH or not endpoint_id.startswith("we_"):
        raise NotFound(f"webhook endpoint {endpoint_id[:_ID_LENGTH]!r} does not exist")
    return endpoint_id


EndpointIdDep = Annotated[str, Depends(endpoint_id_path)]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@router.post(
    "/webhook-endpoints",
    status_code=status.HTTP_201_CREATED,
    response_model=EndpointCreated,
    responses={
        **ERRORS,
        409: {
            "model": ErrorBody,
            "description": "The token already has WEBHOOK_MAX_ENDPOINTS endpoints "
            "(`too_many_endpoints`)",
        },
    },
)
async def create_endpoint(
    caller: CallerDep, body: EndpointCreate, runtime: RuntimeDep
) -> EndpointCreated:
    """Subscribe a URL to this token's events; the answer carries its signing secret."""
    endpoint, secret = await runtime.webhooks.create(caller, body)
    return EndpointCreated(**endpoint.model_dump(), secret=secret)


@router.get("/webhook-endpoints", response_model=EndpointList, responses=ERRORS)
async def list_endpoints(caller: CallerDep, runtime: RuntimeDep) -> EndpointList:
    """This token's endpoints, oldest first."""
    return EndpointList(items=await runtime.webhooks.list(caller))


@router.get(
    "/webhook-endpoints/default/secret",
    response_model=SecretPublic,
    responses=ERRORS,
)
async def default_secret(caller: CallerDep, runtime: RuntimeDep) -> SecretPublic:
    """This token's secret: it signs the webhooks sent to a task's own `webhook_url`."""
    return SecretPublic(secret=runtime.webhooks.default_secret(caller))


@router.get("/webhook-endpoints/{endpoint_id}", response_model=EndpointPublic, responses=_NOT_FOUND)
async def get_endpoint(
    caller: CallerDep, endpoint_id: EndpointIdDep, runtime: RuntimeDep
) -> EndpointPublic:
    """One endpoint."""
    return await runtime.webhooks.get(caller, endpoint_id)


@router.patch(
    "/webhook-endpoints/{endpoint_id}", response_model=EndpointPublic, responses=_NOT_FOUND
)
async def update_endpoint(
    caller: CallerDep, endpoint_id: EndpointIdDep, body: EndpointUpdate, runtime: RuntimeDep
) -> EndpointPublic:
    """Change an endpoint's URL, event types, description, or enable/disable it."""
    return await runtime.webhooks.update(caller, endpoint_id, body)


@router.delete(
    "/webhook-endpoints/{endpoint_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_NOT_FOUND,
)
async def delete_endpoint(
    caller: CallerDep, endpoint_id: EndpointIdDep, runtime: RuntimeDep
) -> Response:
    """Remove an endpoint; what was still queued for it is not sent."""
    await runtime.webhooks.delete(caller, endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/webhook-endpoints/{endpoint_id}/secret", response_model=SecretPublic, responses=_NOT_FOUND
)
async def endpoint_secret(
    caller: CallerDep, endpoint_id: EndpointIdDep, runtime: RuntimeDep
) -> SecretPublic:
    """The endpoint's current signing secret."""
    return SecretPublic(secret=await runtime.webhooks.secret(caller, endpoint_id))


@router.post(
    "/webhook-endpoints/{endpoint_id}/secret/rotate",
    response_model=SecretPublic,
    responses=_NOT_FOUND,
)
async def rotate_secret(
    caller: CallerDep, endpoint_id: EndpointIdDep, runtime: RuntimeDep
) -> SecretPublic:
    """A new secret; the old one still signs too (two signatures) for the grace period."""
    return SecretPublic(secret=await runtime.webhooks.rotate(caller, endpoint_id))


@router.post(
    "/webhook-endpoints/{endpoint_id}/recover",
    response_model=Queued,
    responses={
        **_NOT_FOUND,
        409: {"model": ErrorBody, "description": "The endpoint is disabled"},
    },
)
async def recover(
    caller: CallerDep,
    endpoint_id: EndpointIdDep,
    runtime: RuntimeDep,
    since: Annotated[
        datetime,
        Query(
            description="Resend what failed for events from this instant (ISO 8601; UTC if no "
            "offset).",
            examples=["2026-11-29T00:00:00Z"],
        ),
    ],
    until: Annotated[
        datetime | None, Query(description="Up to this instant (default: now).")
    ] = None,
) -> Queued:
    """Queue again every failed delivery to this endpoint in the window, in order."""
    since_utc = _utc(since)
    assert since_utc is not None
    return Queued(
        queued=await runtime.webhooks.recover(caller, endpoint_id, since_utc, _utc(until))
    )


@router.post(
    "/events/{event_id}/redeliver",
    response_model=Queued,
    responses={**ERRORS, 404: {"model": ErrorBody, "description": "No such event for this token"}},
    tags=["events"],
)
async def redeliver(
    caller: CallerDep,
    event_id: Annotated[
        str,
        Path(description="The event's id (`evt_…`).", examples=["evt_01JDZ6T5Q8M2W3X4Y5Z6A7B8C9"]),
    ],
    runtime: RuntimeDep,
) -> Queued:
    """Send one of this token's events again, same webhook-id, to each subscribed target."""
    return Queued(queued=await runtime.webhooks.redeliver(caller, event_id[:64]))
