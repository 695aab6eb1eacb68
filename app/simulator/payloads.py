"""The provider's JSON shapes: the submit task object and the query/callback snapshot.

``created``, ``completed`` and ``expires_at`` are real Unix times;
``estimated_time`` and ``actual_time`` are simulated seconds (real seconds
divided by ``time_scale``), so a scaled-down run still reports the provider's
usual numbers.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from app.simulator.state import SimTask, Status

FAILURE = {
    "code": "generation_failed",
    "message": "The image could not be generated.",
    "type": "server_error",
}
STALE_PROGRESS = 50


def task_object(task: SimTask, credits: float) -> dict[str, Any]:
    """The submit response, exactly as the provider's page shows it."""
    return {
        "created": task.created,
        "id": task.id,
        "model": task.submission.model,
        "object": "image.generation.task",
        "progress": 0,
        "status": "pending",
        "task_info": {"can_cancel": True, "estimated_time": task.eta},
        "type": "image",
        "usage": {"billing_rule": "per_call", "credits_reserved": credits, "user_group": "default"},
    }


def task_data(
    task: SimTask, *, status: Status | None = None, progress: int | None = None
) -> dict[str, Any]:
    """The query API's ``data`` object, optionally as if the task were in ``status``.

    A forged ``completed`` needs an image link: callers mint one first.
    """
    shown = status or task.status
    if progress is None:
        progress = {
            "pending": 0,
            "completed": 100,
            "processing": task.progress if task.status == "processing" else STALE_PROGRESS,
        }.get(shown, task.progress)
    data: dict[str, Any] = {
        "id": task.id,
        "status": shown,
        "progress": progress,
        "created": task.created,
        "estimated_time": task.eta,
    }
    if shown == "completed":
        link = task.link
        if link is not None:
            url: str | list[str] = [link.url] if task.faults.url == "list" else link.url
            data["result"] = {"images": [{"url": url, "expires_at": link.expires_at}]}
        data["completed"] = task.completed if task.completed is not None else int(time.time())
        data["actual_time"] = task.actual_time if task.actual_time is not None else 0
    elif shown == "failed":
        data["error"] = task.error or dict(FAILURE)
    return data


def wrap(data: dict[str, Any], shape: Literal["envelope", "bare"]) -> dict[str, Any]:
    """The query API's envelope around ``data``, or ``data`` alone."""
    return {"code": 200, "data": data} if shape == "envelope" else data
