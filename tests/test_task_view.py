"""The listing's JSON is byte for byte what serialising the validated TaskPage gives;
an event's data is what dumping the validated view gives."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

from app.models import Image, ImageStatus, Task, TaskStatus
from app.schemas import TaskPage
from app.services.events import task_data
from app.task_view import ImageRow, TaskRow, page_json, task_fields, task_view

BASE = "https://imagetasks.test/base"
AT = datetime(2025, 5, 6, 9, 59, 40, 123456, tzinfo=UTC)


def _task(**fields: object) -> TaskRow:
    values: dict[str, object] = {
        "id": "tsk_01JD3ZQ8W4Y9K2M7N5P6R8S0TV",
        "status": "completed",
        "progress": 100,
        "prompt": 'Un phare à l\'aube \u2028 "quoted" \\ 🌅',
        "model": "gpt-image-2",
        "size": "3:2",
        "quality": "high",
        "resolution": "2k",
        "n": 2,
        "image_urls": ["https://example.com/a.png"],
        "mask_url": "https://example.com/m.png",
        "meta": {"order": "A-1", "deep": {"list": [1, 2.5, 1e300, None, True, "ü"]}},
        "upstream_task_id": "task-unified-1757165031-uyujaw3d",
        "can_cancel": False,
        "usage": {"credits": 2.5, "odd": math.nan, "big": math.inf},
        "error_code": None,
        "error_message": None,
        "image_status": "failed",
        "created_at": AT,
        "updated_at": AT + timedelta(seconds=1),
        "completed_at": AT.replace(microsecond=0),
    }
    values.update(fields)
    return TaskRow(**values)  # type: ignore[arg-type]


def _image(position: int, **fields: object) -> ImageRow:
    values: dict[str, object] = {
        "position": position,
        "status": "stored",
        "content_type": "image/png",
        "size_bytes": 1843221,
        "sha256": "ab" * 32,
        "width": 1024,
        "height": 1536,
        "stored_at": AT,
        "source_expires_at": AT + timedelta(days=1),
        "error_code": None,
        "error_message": None,
    }
    values.update(fields)
    return ImageRow(**values)  # type: ignore[arg-type]


def test_page_json_is_the_validated_pages_bytes() -> None:
    """Odd text, nested metadata, non-finite numbers in usage, an image error, a task
    error, no images: the same bytes as TaskPage's own serialisation, field by field."""
    rows = [
        (_task(), [_image(0), _image(1, status="failed", error_code="too_large")]),
        (
            _task(
                id="tsk_01JD3ZQ8W4Y9K2M7N5P6R8S0TW",
                status="failed",
                error_code="content_policy_violation",
                error_message="refused",
                usage=None,
                completed_at=None,
            ),
            [],
        ),
    ]
    expected = TaskPage(
        items=[task_view(task, images, BASE) for task, images in rows], next_cursor="abc"
    ).model_dump_json()
    built = page_json([task_fields(task, images, BASE) for task, images in rows], "abc")
    assert built == expected.encode()
    assert page_json([], None) == TaskPage(items=[], next_cursor=None).model_dump_json().encode()


def test_event_data_is_the_validated_views_json_values() -> None:
    """Every status, image state and error, from plain rows and from ORM objects: an
    event's `data` holds what dumping the validated view gives, key order included."""
    errors = [(None, None), ("content_policy_violation", "refused"), ("timeout", None)]
    for status in TaskStatus:
        for image_status in ImageStatus:
            for code, message in errors:
                task = _task(status=status.value, error_code=code, error_message=message)
                images = [
                    _image(0, status=image_status.value),
                    _image(1, status=image_status.value, error_code=code, error_message=message),
                ]
                for shown, shown_images in (
                    (task, images),
                    (
                        Task(owner="o", **{**task._asdict(), "status": status}),
                        [Image(task_id=task.id, **image._asdict()) for image in images],
                    ),
                    (task, []),
                ):
                    expected = task_view(shown, shown_images, "").model_dump(mode="json")
                    built = task_data(shown, shown_images)
                    assert built == expected
                    assert json.dumps(built) == json.dumps(expected)
