"""The API shapes of webhook endpoints and deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.events.schemas import _EXAMPLE_EVENT, EventPublic
from app.webhooks.repository import DELIVERED, FAILED, PENDING

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
    description: str | None = Field(
        default=None, max_length=500, description="A note for people: who receives it, and why."
    )
    enabled: bool = Field(default=True, description="false creates it paused.")


class EndpointUpdate(BaseModel):
    """Fields to change; the others stay."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"enabled": True}, {"event_types": ["image.stored"]}]},
    )

    url: str | None = Field(
        default=None, max_length=2000, description="A new destination (checked as on creation)."
    )
    event_types: list[str] | None = Field(
        default=None, max_length=20, description="The event types to send from now on."
    )
    description: str | None = Field(default=None, max_length=500, description="A new note.")
    enabled: bool | None = Field(
        default=None, description="false pauses deliveries; true re-enables a disabled endpoint."
    )


class EndpointPublic(BaseModel):
    """One endpoint (its secret is read at /webhook-endpoints/{id}/secret)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_ENDPOINT_EXAMPLE]})

    id: str = Field(description="`we_` and a sortable id.")
    url: str = Field(description="Where the events are POSTed.")
    event_types: list[str] = Field(description="The event types sent there.")
    description: str | None = Field(description="The note given when it was made.")
    enabled: bool = Field(description="false: nothing is sent (paused, or disabled: see why).")
    disabled_reason: str | None = Field(
        json_schema_extra={"enum": ["gone", "failing", "caller", None]},
        description="Why it was disabled: `gone` (it answered 410), `failing` (every delivery "
        "failed for WEBHOOK_DISABLE_AFTER_SECONDS), `caller` (PATCH enabled=false).",
    )
    failing_since: datetime | None = Field(description="Since when every delivery has failed.")
    created_at: datetime = Field(description="When it was made (UTC).")
    updated_at: datetime = Field(description="When it last changed (UTC).")


class EndpointCreated(EndpointPublic):
    """A new endpoint, with its signing secret."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_ENDPOINT_EXAMPLE, "secret": "whsec_MfKQ9r8Gkz…"}]}
    )

    secret: str = Field(description="`whsec_…`: verifies this endpoint's webhook-signature.")


class EndpointList(BaseModel):
    """This token's endpoints, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_ENDPOINT_EXAMPLE]}]})

    items: list[EndpointPublic] = Field(description="The endpoints, oldest first.")


class SecretPublic(BaseModel):
    """A signing secret (Standard Webhooks `whsec_` form)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"secret": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"}]}
    )

    secret: str = Field(description="`whsec_` and the base64 key that signs webhook-signature.")


class Queued(BaseModel):
    """How many deliveries were queued."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"queued": 3}]})

    queued: int = Field(description="Deliveries queued (0: no target is subscribed).")


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


class AttemptPublic(BaseModel):
    """One try at sending a webhook."""

    model_config = ConfigDict(json_schema_extra={"examples": [_DELIVERY_EXAMPLE["attempts"][0]]})

    attempted_at: datetime = Field(description="When the attempt started (UTC).")
    status_code: int | None = Field(description="The receiver's answer (null: none came).")
    duration_ms: int = Field(description="How long it took, in milliseconds.")
    error: str | None = Field(description="Why it failed (null: it succeeded).")


class DeliveryPublic(BaseModel):
    """One event's delivery to one target, and every attempt at it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_DELIVERY_EXAMPLE]})

    endpoint_id: str | None = Field(description="The endpoint (null: the task's webhook_url).")
    status: str = Field(
        description="`pending` (queued or retrying), `delivered` or `failed`.",
        json_schema_extra={"enum": [PENDING, DELIVERED, FAILED]},
    )
    attempts: list[AttemptPublic] = Field(description="Every attempt so far, oldest first.")
    next_attempt_at: datetime | None = Field(
        description="When it is tried next (null: not scheduled)."
    )
    delivered_at: datetime | None = Field(description="When a 2xx answer came (null: not yet).")


class TaskEvent(EventPublic):
    """An event of the task, with its webhook deliveries (the task owner's)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EXAMPLE_EVENT, "deliveries": [_DELIVERY_EXAMPLE]}]}
    )

    deliveries: list[DeliveryPublic] = Field(
        default_factory=list,
        description="Its webhook deliveries to this token's endpoints and task URLs.",
    )


class TaskEventPage(BaseModel):
    """A page of one task's events, oldest first, with their deliveries."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [{**_EXAMPLE_EVENT, "deliveries": [_DELIVERY_EXAMPLE]}],
                    "next_cursor": "7319.42",
                    "has_more": False,
                }
            ]
        }
    )

    items: list[TaskEvent] = Field(description="The task's events, oldest first.")
    next_cursor: str | None = Field(
        description="Pass back as `after` for the events that follow (null: none seen yet)."
    )
    has_more: bool = Field(description="More events are already waiting after this page.")
