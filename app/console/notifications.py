"""The console's view of webhooks to callers: each delivery of a task's events with
its attempts, and redelivery, read and written through the webhooks' repository."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.console.hooks import NotificationView
from app.errors import NotFound
from app.events.repository import EVENTS
from app.models import utcnow
from app.webhooks import repository

SHOWN = 200  # deliveries on one page: a task has a handful of events, each a few targets


def _target(target: str) -> str:
    return "the task's webhook_url" if target == repository.TASK_TARGET else f"endpoint {target}"


class WebhookNotifications:
    """`app.console.hooks.Notifications` over the webhook outbox and its attempt records."""

    async def for_task(self, db: AsyncConnection, task_id: str) -> list[NotificationView]:
        """The task's deliveries, oldest first, each with its last outcome."""
        events = (
            await db.execute(
                select(EVENTS.c.id, EVENTS.c.type, EVENTS.c.owner)
                .where(EVENTS.c.task_id == task_id)
                .order_by(EVENTS.c.seq)
            )
        ).all()
        if not events:
            return []
        kinds = {event.id: event.type for event in events}
        found = await repository.deliveries_of(db, list(kinds), events[0].owner)
        views: list[NotificationView] = []
        for event_id, deliveries in found.items():
            for delivery, attempts in deliveries:
                last = attempts[-1] if attempts else None
                if last is None:
                    outcome = "not sent yet"
                elif last.status_code is not None:
                    outcome = f"HTTP {last.status_code}"
                else:
                    outcome = last.error or "no answer"
                summary = (
                    f"{kinds[event_id]} → {_target(delivery.target)}: {delivery.status}, "
                    f"{len(attempts)} attempt(s), last {outcome}"
                )
                at = last.attempted_at if last is not None else delivery.created_at
                failed = delivery.status == "failed"
                views.append(NotificationView(event_id, at, summary, failed))
        return sorted(views, key=lambda view: view.at)[:SHOWN]

    async def redeliver(self, db: AsyncConnection, task_id: str, notification_id: str) -> None:
        """Send the event again to each of its targets (the webhooks' own redelivery)."""
        event = (
            await db.execute(
                select(EVENTS.c.id, EVENTS.c.type, EVENTS.c.owner).where(
                    EVENTS.c.id == notification_id, EVENTS.c.task_id == task_id
                )
            )
        ).first()
        if event is None:
            raise NotFound(f"task {task_id} has no event {notification_id[:64]!r}")
        await repository.redeliver(
            db,
            event_id=event.id,
            kind=event.type,
            task_id=task_id,
            owner=event.owner,
            now=utcnow(),
        )
