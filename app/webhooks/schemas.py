"""The API shapes of webhook endpoints and deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.events.schemas import _EXAMPLE_EVENT, EventPublic

_TYPES_DESCRIPTION = (
    "Event types to send (default: the settled ones: task.failed, task.cancelled, "
    "image.stored, image.failed)."
)
_ENDPOINT_EXAMPLE: dict[str, Any] = {
    "id": "we_01JDZ6T5Q8M2W3X4Y5Z6A7B8C9",
    "url": "https://orders.internal.example.net/hooks/imagetasks",
    "event_types": ["image.stored", "image.failed", "task.failed", "task.cancelled"],
    "description": "order service",
    "enabled": True,
    "disabled_reason": None,
    "failing_since": None,
    "created_at": "2026-11-29T10:40:00Z",
    "updated_at": "2026-11-29T10:40:00Z",
}


class EndpointCreate(BaseModel):
    """A standing subscription to this token's events."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://orders.internal.example.net/hooks/imagetasks",
                    "event_types": ["image.stored", "image.failed"],
                    "description": "order service",
                }
            ]
        },
    )

    url: str = Field(
        max_length=2000,
        description="https:// (http:// only inside WEBHOOK_ALLOWED_NETWORKS); no credentials.",
    )
    event_types: list[str] | None = Field(
        default=None, max_length=20, description=_TYPES_DESCRIPTION
    )
    description: str | None = Field(default=None, max_length=500)
    enabled: bool = True


class EndpointUpdate(BaseModel):
    """Fields to change; the others stay."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"enabled": True}, {"event_types": ["image.stored"]}]},
    )

    url: str | None = Field(default=None, max_length=2000)
    event_types: list[str] | None = Field(default=None, max_length=20)
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = Field(
        default=None, description="false pauses deliveries; true re-enables a disabled endpoint."
    )


class EndpointPublic(BaseModel):
    """One endpoint (its secret is read at /webhook-endpoints/{id}/secret)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_ENDPOINT_EXAMPLE]})

    id: str
    url: str
    event_types: list[str]
    description: str | None
    enabled: bool
    disabled_reason: str | None = Field(
        description="Why it was disabled: `gone` (it answered 410), `failing` (every delivery "
        "failed for WEBHOOK_DISABLE_AFTER_SECONDS), `caller` (PATCH enabled=false)."
    )
    failing_since: datetime | None = Field(description="Since when every delivery has failed.")
    created_at: datetime
    updated_at: datetime


class EndpointCreated(EndpointPublic):
    """A new endpoint, with its signing secret."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_ENDPOINT_EXAMPLE, "secret": "whsec_MfKQ9r8Gkz…"}]}
    )

    secret: str = Field(description="`whsec_…`: verifies this endpoint's webhook-signature.")


class EndpointList(BaseModel):
    """This token's endpoints, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_ENDPOINT_EXAMPLE]}]})

    items: list[EndpointPublic]


class SecretPublic(BaseModel):
    """A signing secret (Standard Webhooks `whsec_` form)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"secret": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"}]}
    )

    secret: str


class Queued(BaseModel):
    """How many deliveries were queued."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"queued": 3}]})

    queued: int


class AttemptPublic(BaseModel):
    """One try at sending a webhook."""

    attempted_at: datetime
    status_code: int | None = Field(description="The receiver's answer (null: none came).")
    duration_ms: int
    error: str | None = Field(description="Why it failed (null: it succeeded).")


class DeliveryPublic(BaseModel):
    """One event's delivery to one target, and every attempt at it."""

    endpoint_id: str | None = Field(description="The endpoint (null: the task's webhook_url).")
    status: str = Field(description="`pending` (queued or retrying), `delivered` or `failed`.")
    attempts: list[AttemptPublic]
    next_attempt_at: datetime | None
    delivered_at: datetime | None


_DELIVERY_EXAMPLE: dict[str, Any] = {
    "endpoint_id": None,
    "status": "delivered",
    "attempts": [
        {
            "attempted_at": "2026-11-29T10:42:07.200000Z",
            "status_code": 500,
            "duration_ms": 12,
            "error": "answered 500",
        },
        {
            "attempted_at": "2026-11-29T10:42:12.230000Z",
            "status_code": 200,
            "duration_ms": 9,
            "error": None,
        },
    ],
    "next_attempt_at": None,
    "delivered_at": "2026-11-29T10:42:12.240000Z",
}


class TaskEvent(EventPublic):
    """An event of the task, with its webhook deliveries (the task owner's)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EXAMPLE_EVENT, "deliveries": [_DELIVERY_EXAMPLE]}]}
    )

    deliveries: list[DeliveryPublic] = Field(default_factory=list)


class TaskEventPage(BaseModel):
    """A page of one task's events, oldest first, with their deliveries."""

    items: list[TaskEvent]
    next_cursor: str | None
    has_more: bool
