"""`Prefer: wait=N` (RFC 7240): answer once the task settles, or with its state at N s."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from app.errors import Unprocessable
from app.events.bus import EventBus
from app.schemas import TaskPublic

MAX_WAIT_SECONDS = 60


def requested_wait(prefer: str | None) -> int | None:
    """The `wait` preference in seconds (capped at 60); None when not asked.

    A value that is not a positive whole number is refused with 422, before
    anything is done.
    """
    if not prefer:
        return None
    for preference in prefer.split(","):
        name, _, value = preference.split(";")[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not value.isdigit() or int(value) < 1:
            reason = f"wait must be a whole number of seconds from 1 to {MAX_WAIT_SECONDS}"
            raise Unprocessable(
                f"Prefer: {reason}", details=[{"field": "Prefer", "reason": reason}]
            )
        return min(int(value), MAX_WAIT_SECONDS)
    return None


async def wait_until_settled(
    bus: EventBus, task_id: str, seconds: float, read: Callable[[], Awaitable[TaskPublic]]
) -> TaskPublic:
    """Read the task now and again on each of its events, until settled or out of time.

    Subscribes before the first read, so an event committed in between still rings.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with bus.subscribe(lambda notice: notice.task_id == task_id) as bell:
        current = await read()
        while not current.settled and not bus.closing.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            if await bell.wait(left):
                current = await read()
    return current
