"""The provider's JSON shapes: the submit answer and the query/callback snapshot.

A snapshot comes in one of three shapes (``Shape``):

- ``published``: the bare task object of the provider's task page,
  ``{"id", "object", "type", "model", "status", "progress", "created",
  "task_info": {"can_cancel"}}`` plus ``results`` (one URL string per image)
  when completed and ``error`` when failed; no expiry.
- ``envelope``: ``{"code": 200, "data": {…}}`` as other aggregators of the
  same backend answer, with ``result.images[].url`` and ``expires_at``,
  ``completed``, ``actual_time`` and ``estimated_time``.
- ``bare``: that ``data`` object without the envelope.

``created``, ``completed`` and ``expires_at`` are real Unix times;
``estimated_time`` and ``actual_time`` are simulated seconds (real seconds
divided by ``time_scale``), so a scaled-down run still reports the provider's
usual numbers.
"""

from __future__ import annotations

import time
from typing import Any

from app.simulator.faults import DEFAULT_ERROR_CODE, Shape
from app.simulator.models import MODELS, usage
from app.simulator.state import SimTask, SimulatorState, Status

FAILURE_MESSAGE = "The simulator failed this task on request."
STALE_PROGRESS = 50
OBJECT = "image.generation.task"


def shape_of(state: SimulatorState, task: SimTask) -> Shape:
    """The shape of the task's query answers and callbacks: its fault, else the config's."""
    return task.faults.body or state.config.body_shape


def failure(code: str = DEFAULT_ERROR_CODE) -> dict[str, Any]:
    """A failed task's ``error`` object with a published code."""
    return {"code": code, "message": FAILURE_MESSAGE, "type": "task_error"}


def submit_answer(task: SimTask) -> dict[str, Any]:
    """The submit response, as the provider's page shows it, with the model's usage."""
    submission = task.submission
    return {
        "created": task.created,
        "id": task.id,
        "model": submission.model,
        "object": OBJECT,
        "progress": 0,
        "status": "pending",
        "task_info": {"can_cancel": True, "estimated_time": task.eta},
        "type": "image",
        "usage": usage(
            MODELS[submission.model],
            n=submission.n,
            quality=submission.quality,
            width=submission.width,
            height=submission.height,
        ),
    }


def _progress(task: SimTask, shown: Status, progress: int | None) -> int:
    if progress is not None:
        return progress
    return {
        "pending": 0,
        "completed": 100,
        "processing": task.progress if task.status == "processing" else STALE_PROGRESS,
    }.get(shown, task.progress)


def _published(task: SimTask, shown: Status, progress: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task.id,
        "object": OBJECT,
        "type": "image",
        "model": task.submission.model,
        "status": shown,
        "progress": progress,
        "created": task.created,
        "task_info": {"can_cancel": shown in ("pending", "processing")},
    }
    if shown == "completed":
        body["results"] = [link.url for link in task.current_links]
    elif shown == "failed":
        body["error"] = task.error or failure()
    return body


def _data(task: SimTask, shown: Status, progress: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": task.id,
        "status": shown,
        "progress": progress,
        "created": task.created,
        "estimated_time": task.eta,
    }
    if shown == "completed":
        as_list = task.faults.url == "list"
        data["result"] = {
            "images": [
                {"url": [link.url] if as_list else link.url, "expires_at": link.expires_at}
                for link in task.current_links
            ]
        }
        data["completed"] = task.completed if task.completed is not None else int(time.time())
        data["actual_time"] = task.actual_time if task.actual_time is not None else 0
    elif shown == "failed":
        data["error"] = task.error or failure()
    return data


def snapshot(
    task: SimTask, shape: Shape, *, status: Status | None = None, progress: int | None = None
) -> dict[str, Any]:
    """The task in ``shape``, optionally as if it were in ``status`` with ``progress``.

    A forged ``completed`` needs image links: callers mint them first.
    """
    shown = status or task.status
    shown_progress = _progress(task, shown, progress)
    if shape == "published":
        return _published(task, shown, shown_progress)
    data = _data(task, shown, shown_progress)
    return {"code": 200, "data": data} if shape == "envelope" else data


def cancelled_answer(task: SimTask) -> dict[str, Any]:
    """The answer to ``DELETE /v1/tasks/{id}``, as the unpublished draft describes it."""
    return {
        "id": task.id,
        "object": "task.cancelled",
        "status": "cancelled",
        "message": "The task has been cancelled.",
    }
