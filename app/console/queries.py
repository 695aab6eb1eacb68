"""What the console reads: gallery pages (through the API's listing and cursor),
one task's timeline, and the overview's figures.

Read-only. The overview's figures each use an index: counts by status and image
status scan `ix_tasks_status_created` / `ix_tasks_image_status_created`; the
24-hour figures start from `ix_tasks_created`, `ix_tasks_completed_at`,
`ix_images_stored_at`, `ix_callback_deliveries_received_at` and
`ix_webhook_deliveries_created_at`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import activity, repository
from app.api.tasks import encode_cursor
from app.db import metadata
from app.events import repository as event_repository
from app.events.feed import encode_cursor as encode_event_cursor
from app.models import Image, Task, TaskStatus
from app.webhooks import repository as webhooks

TASKS: Table = metadata.tables["tasks"]
IMAGES: Table = metadata.tables["images"]
DELIVERIES: Table = metadata.tables["callback_deliveries"]
WEBHOOKS: Table = metadata.tables["webhook_deliveries"]
WINDOW = timedelta(hours=24)
TIMELINE_LIMIT = 500


@dataclass(frozen=True)
class GalleryPage:
    tasks: repository.ListedPage
    next_cursor: str | None


async def gallery_page(
    db: AsyncConnection,
    filters: repository.TaskFilter,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
) -> GalleryPage:
    """Newest tasks matching the filters, with their images, and the next page's cursor."""
    listed = await repository.list_tasks(db, filters, limit=limit + 1, after=after)
    last = listed[limit - 1][0] if len(listed) > limit else None
    next_cursor = encode_cursor(last.created_at, last.id) if last else None
    return GalleryPage(listed[:limit], next_cursor)


async def stream_start(engine: AsyncEngine) -> str | None:
    """The event log's position now: a live view that follows from here misses nothing."""
    async with engine.connect() as db:
        below = await event_repository.horizon(db)
        end = await event_repository.newest_position(db, below_txid=below)
        await db.rollback()
    return encode_event_cursor(*end) if end is not None else None


@dataclass(frozen=True)
class Entry:
    """One line of a task's timeline."""

    at: datetime
    title: str
    detail: str = ""
    tone: str = "info"  # info, good, bad, warn


_EVENT_TITLES = {
    "task.created": ("Created", "info"),
    "task.processing": ("Processing", "info"),
    "task.completed": ("Completed at StarMagic", "good"),
    "task.failed": ("Failed", "bad"),
    "task.cancelled": ("Cancelled", "warn"),
    "image.stored": ("Image stored", "good"),
    "image.failed": ("Image download failed", "bad"),
    "image.queued": ("Image download queued again", "warn"),
}
_DELIVERY_TONES = {"applied": "good", "duplicate": "info", "stale": "info"}


def _event_entry(row: Any) -> Entry:
    title, tone = _EVENT_TITLES.get(row.type, (row.type, "info"))
    data: dict[str, Any] = row.data or {}
    detail = ""
    if row.type == "task.created" and data.get("upstream_task_id"):
        detail = f"StarMagic accepted it as {data['upstream_task_id']}"
    elif row.type == "task.processing":
        detail = f"progress {data.get('progress', 0)}%"
    elif row.type == "task.failed" and data.get("error"):
        detail = f"{data['error'].get('code')}: {data['error'].get('message')}"
    elif "image_index" in data:
        images = data.get("images") or []
        index = int(data["image_index"])
        image = images[index] if index < len(images) else {}
        error = image.get("error") or {}
        detail = f"image {index}" + (
            f" — {error.get('code')}: {error.get('message')}" if error else ""
        )
    return Entry(row.created_at, title, detail, tone)


async def timeline(db: AsyncConnection, task: Task, images: Sequence[Image]) -> list[Entry]:
    """Everything the service recorded about the task, oldest first."""
    entries = [Entry(task.created_at, "Submitted", f"model {task.model}, {task.n} image(s)")]
    scope = event_repository.EventScope(task_id=task.id)
    rows = await event_repository.read_events(
        db, scope, after=None, limit=TIMELINE_LIMIT, below_txid=None
    )
    entries += [_event_entry(row) for row in rows]
    deliveries = await db.execute(
        select(DELIVERIES)
        .where(DELIVERIES.c.task_id == task.id)
        .order_by(DELIVERIES.c.id)
        .limit(TIMELINE_LIMIT)
    )
    for delivery in deliveries:
        said = delivery.upstream_status or "no status"
        tone = _DELIVERY_TONES.get(delivery.outcome, "warn")
        changed = "; changed the task" if delivery.changed else ""
        entries.append(
            Entry(
                delivery.received_at,
                "Callback received",
                f"{said} → {delivery.outcome}{changed}",
                tone,
            )
        )
    for row in await activity.for_task(db, task.id, limit=TIMELINE_LIMIT):
        if row.kind == activity.Kind.SUBMIT:
            title = f"StarMagic's answer to the submission: {row.outcome}"
            tone = "info" if row.outcome == "accepted" else "bad"
        elif row.kind == activity.Kind.DOWNLOAD:
            title = f"Download attempt (image {row.position}): {row.outcome}"
            tone = {"stored": "good", "failed": "bad", "retry": "warn"}.get(row.outcome, "info")
        else:
            title = f"Query to StarMagic: {row.outcome}"
            tone = "info" if row.outcome == "ok" else "warn"
        entries.append(Entry(row.at, title, row.detail or "", tone))
    for image in images:
        if image.stored_at is not None:
            size = f"{image.width}x{image.height}, " if image.width else ""
            detail = f"{image.key} — {size}{image.size_bytes} bytes, sha256 {image.sha256}"
            entries.append(
                Entry(image.stored_at, f"Stored object (image {image.position})", detail, "good")
            )
    # Stable: records of the same instant keep the order they were gathered in.
    return sorted(entries, key=lambda entry: entry.at)


@dataclass
class Overview:
    by_status: dict[str, int] = field(default_factory=dict)
    by_image_status: dict[str, int] = field(default_factory=dict)
    created: int = 0
    completed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    stored_p50: float | None = None
    stored_p95: float | None = None
    stored: int = 0
    callbacks_by_outcome: dict[str, int] = field(default_factory=dict)
    images_lost: int = 0
    # Webhooks to callers queued in the window: given up on, and still being retried.
    notifications_failed: int = 0
    notifications_retrying: int = 0
    per_hour: list[tuple[datetime, int]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failed_by_reason.values())


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted `values` (None when empty)."""
    if not values:
        return None
    rank = max(1, -(-len(values) * fraction // 1))  # ceil without floats drifting
    return values[int(rank) - 1]


async def _completion_to_stored(
    db: AsyncConnection, since: datetime
) -> tuple[int, float | None, float | None]:
    """Images stored since then, and the p50/p95 of completion → stored in seconds."""
    stored = IMAGES.join(TASKS, TASKS.c.id == IMAGES.c.task_id)
    window = (IMAGES.c.stored_at >= since, TASKS.c.completed_at.is_not(None))
    if db.dialect.name == "postgresql":
        # In the database: a day of a busy service is tens of thousands of rows.
        seconds = func.extract("epoch", IMAGES.c.stored_at - TASKS.c.completed_at)
        row = (
            await db.execute(
                select(
                    func.count(),
                    func.percentile_disc(0.5).within_group(seconds),
                    func.percentile_disc(0.95).within_group(seconds),
                )
                .select_from(stored)
                .where(*window)
            )
        ).one()
        count, p50, p95 = row
        return int(count), _seconds(p50), _seconds(p95)
    durations = sorted(
        max(0.0, (done - completed).total_seconds())
        for done, completed in await db.execute(
            select(IMAGES.c.stored_at, TASKS.c.completed_at).select_from(stored).where(*window)
        )
    )
    return len(durations), percentile(durations, 0.5), percentile(durations, 0.95)


def _seconds(value: Any) -> float | None:
    return None if value is None else max(0.0, float(value))


def _plain(db: AsyncConnection, column: Any) -> Any:
    """The column, kept from steering SQLite's plan: grouping by an indexed column makes
    it walk that index (the whole table) instead of the window's range on another."""
    if db.dialect.name != "sqlite":
        return column
    return literal_column(f"+{column.table.name}.{column.name}", type_=column.type)


def _hour_bucket(db: AsyncConnection, column: Any) -> Any:
    if db.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD HH24")
    return func.strftime("%Y-%m-%d %H", column)


async def overview(db: AsyncConnection, now: datetime) -> Overview:
    """The overview's figures, each from one indexed query."""
    since = now - WINDOW
    result = Overview()
    for status, count in await db.execute(
        select(TASKS.c.status, func.count()).group_by(TASKS.c.status)
    ):
        result.by_status[status] = count
    for status, count in await db.execute(
        select(TASKS.c.image_status, func.count())
        .where(TASKS.c.image_status.is_not(None))
        .group_by(TASKS.c.image_status)
    ):
        result.by_image_status[status] = count
    created = select(func.count()).where(TASKS.c.created_at >= since)
    result.created = int((await db.execute(created)).scalar_one())
    status_column, code_column = _plain(db, TASKS.c.status), _plain(db, TASKS.c.error_code)
    for status, code, count in await db.execute(
        select(status_column, code_column, func.count())
        .where(TASKS.c.completed_at >= since)
        .group_by(status_column, code_column)
    ):
        if status == TaskStatus.COMPLETED:
            result.completed += count
        elif status == TaskStatus.FAILED:
            reason = code or "unknown"
            result.failed_by_reason[reason] = result.failed_by_reason.get(reason, 0) + count
        elif status == TaskStatus.CANCELLED:
            result.cancelled += count
    result.stored, result.stored_p50, result.stored_p95 = await _completion_to_stored(db, since)
    for outcome, count in await db.execute(
        select(DELIVERIES.c.outcome, func.count())
        .where(DELIVERIES.c.received_at >= since)
        .group_by(DELIVERIES.c.outcome)
    ):
        result.callbacks_by_outcome[outcome] = count
    lost = (
        select(func.count())
        .select_from(IMAGES.join(TASKS, TASKS.c.id == IMAGES.c.task_id))
        .where(TASKS.c.completed_at >= since, IMAGES.c.status == "failed")
    )
    result.images_lost = int((await db.execute(lost)).scalar_one())
    for status, count in await db.execute(
        select(WEBHOOKS.c.status, func.count())
        .where(
            WEBHOOKS.c.created_at >= since,
            or_(
                WEBHOOKS.c.status == webhooks.FAILED,
                and_(WEBHOOKS.c.status == webhooks.PENDING, WEBHOOKS.c.attempts > 0),
            ),
        )
        .group_by(WEBHOOKS.c.status)
    ):
        if status == webhooks.FAILED:
            result.notifications_failed = int(count)
        else:
            result.notifications_retrying = int(count)
    bucket = _hour_bucket(db, TASKS.c.created_at)
    hourly = select(bucket, func.count()).where(TASKS.c.created_at >= since).group_by(bucket)
    counts: dict[str, int] = {str(hour): int(count) for hour, count in await db.execute(hourly)}
    first = since.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    hours = [first + timedelta(hours=i) for i in range(24)]
    result.per_hour = [(hour, counts.get(f"{hour:%Y-%m-%d %H}", 0)) for hour in hours]
    return result
