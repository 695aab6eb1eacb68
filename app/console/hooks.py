"""Where notifications to callers plug into the console, once the service keeps them.

Set `app.state.console_notifications` to an object with these two methods: the
task's page then lists each notification with a Redeliver button, and its
timeline shows them. Until then the page says none are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True)
class NotificationView:
    """One notification to a caller, as the console shows it."""

    id: str
    at: datetime
    summary: str  # e.g. "image.stored → https://caller.internal/hook: 200 after 1 attempt"
    failed: bool = False


class Notifications(Protocol):
    """What the console asks of the notification store."""

    async def for_task(self, db: AsyncConnection, task_id: str) -> list[NotificationView]:
        """The task's notifications, oldest first."""
        ...

    async def redeliver(self, db: AsyncConnection, task_id: str, notification_id: str) -> None:
        """Queue the notification to be sent again (NotFound if it is not the task's)."""
        ...
