"""Waiting for a task's image, with a live progress bar on stderr: by polling (the
demo, which also peeks at the provider) or by `Prefer: wait` (`submit --wait`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from app.client.api import ApiClient, Task
from app.client.errors import FAILED, CliError
from app.client.output import err

# Given the service's view of a pending task, a fresher (label, progress), if known.
Peek = Callable[[Task], tuple[str, int] | None]


def _phase(task: Task, peek: Peek | None) -> tuple[str, float, bool]:
    """Description, bar percentage, and whether the image is stored; CliError on failure."""
    # Generation fills 90% of the bar; storing the image is the last stretch.
    status, image = task["status"], task.get("image") or {}
    if status in ("failed", "cancelled"):
        error = task.get("error") or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        raise CliError(f"task {task['id']} {status}{reason}", FAILED)
    if status != "completed":
        seen = peek(task) if peek else None
        label, progress = seen or (status, int(task.get("progress") or 0))
        return label, progress * 0.9, False
    if image.get("status") == "failed":
        error = image.get("error") or {}
        raise CliError(
            f"task {task['id']} completed but its image could not be stored: "
            f"{error.get('code')}: {error.get('message')}",
            FAILED,
        )
    stored = image.get("status") == "stored"
    return ("stored" if stored else "completed, storing the image"), (100 if stored else 90), stored


def wait_for_image(
    client: ApiClient,
    task_id: str,
    *,
    timeout: float,
    interval: float = 0.5,
    peek: Peek | None = None,
) -> Task:
    """Poll the task with a live bar on stderr until its image is stored."""
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description:<30}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err) as progress:
        bar = progress.add_task("submitted", total=100)
        while True:
            task = client.task(task_id)
            label, percent, stored = _phase(task, peek)
            progress.update(bar, description=label, completed=percent)
            if stored:
                return task
            if time.monotonic() > deadline:
                raise CliError(
                    f"gave up after {timeout:g} s: task {task_id} is still {label} "
                    f"(see `imagetasks show {task_id}`)",
                    FAILED,
                )
            time.sleep(interval)


def wait_until_settled(client: ApiClient, task: Task, *, timeout: float) -> Task:
    """Ask the service to answer once the task settles (`Prefer: wait`), a minute at a
    time, with a bar on stderr; the settled task, or CliError on failure or timeout."""
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description:<30}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err) as progress:
        bar = progress.add_task("submitted", total=100)
        while True:
            label, percent, _ = _phase(task, None)
            progress.update(bar, description=label, completed=percent)
            if task.get("settled"):
                _phase_of_every_image(task)
                return task
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(
                    f"gave up after {timeout:g} s: task {task['id']} is still {label} "
                    f"(see `imagetasks show {task['id']}`)",
                    FAILED,
                )
            task = client.task(task["id"], wait=max(1, min(MAX_WAIT_SECONDS, int(left))))


MAX_WAIT_SECONDS = 60


def _phase_of_every_image(task: Task) -> None:
    """CliError naming the first image that could not be stored."""
    for image in task.get("images") or []:
        if image.get("status") == "failed":
            error = image.get("error") or {}
            raise CliError(
                f"task {task['id']} completed but image {image.get('index', 0)} could not be "
                f"stored: {error.get('code')}: {error.get('message')}",
                FAILED,
            )
