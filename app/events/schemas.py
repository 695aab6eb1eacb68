"""The event log's API shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.services.events import EventType

_EXAMPLE_EVENT: dict[str, Any] = {
    "id": "evt_01JDZ6T5Q8M2W3X4Y5Z6A7B8C9",
    "type": "image.stored",
    "created_at": "2026-11-29T10:42:07.120000Z",
    "data": {
        "id": "tsk_01JDZ6SZ0000000000000000AB",
        "status": "completed",
        "progress": 100,
        "settled": True,
        "image_index": 0,
        "image": {
            "index": 0,
            "status": "stored",
            "url": "https://imagetasks.example.com/tasks/tsk_01JDZ6SZ0000000000000000AB/image",
        },
        "...": "the rest of the task, as GET /tasks/{id} shows it",
    },
}


class EventPublic(BaseModel):
    """One change to a task, with the task as it was at that moment."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_EVENT]})

    id: str = Field(description="`evt_` and a sortable id; also the webhook-id of its delivery.")
    type: str = Field(
        description="task.created, task.processing, task.completed, task.failed, "
        "task.cancelled, image.stored, image.failed or image.queued (and endpoint.disabled, "
        "about a webhook endpoint of this token).",
        json_schema_extra={"enum": [kind.value for kind in EventType]},
    )
    created_at: datetime = Field(description="When the change was committed (UTC).")
    data: dict[str, Any] = Field(
        description="The task as GET /tasks/{id} showed it when the event happened; "
        "image.* events also carry `image_index`, the image they are about."
    )


class EventPage(BaseModel):
    """A page of the event log, oldest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_EXAMPLE_EVENT], "next_cursor": "7319.42", "has_more": False}]
        }
    )

    items: list[EventPublic] = Field(description="The events, oldest first.")
    next_cursor: str | None = Field(
        description="Pass back as `after` for the events that follow (null: none seen yet)."
    )
    has_more: bool = Field(description="More events are already waiting after this page.")
