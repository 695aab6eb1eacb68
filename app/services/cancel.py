"""Cancelling a task: asked of the provider, believed only when it confirms."""

from __future__ import annotations

from datetime import timedelta

import structlog

from app import repository
from app.config import Settings
from app.db import SessionFactory
from app.errors import BadGateway, Conflict, DomainError, NotFound, ServiceUnavailable
from app.models import TaskStatus, utcnow
from app.services.snapshots import Applied, Outcome, apply_snapshot, log_transition
from app.upstream import (
    StarMagicClient,
    UpstreamCancelUnsupported,
    UpstreamRejected,
    UpstreamUnavailable,
)

log = structlog.get_logger(__name__)


class CancelNotSupported(DomainError):
    status_code = 501
    code = "cancel_not_supported"


def _not_cancellable(message: str) -> Conflict:
    return Conflict(message, code="not_cancellable")


async def cancel_task(
    factory: SessionFactory, client: StarMagicClient, settings: Settings, task_id: str
) -> Applied:
    """Ask the provider to cancel; apply its answer (the task is cancelled only if it says so)."""
    async with factory() as session:
        task = await repository.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    status = TaskStatus(task.status)
    if status.terminal:
        raise _not_cancellable(f"task {task_id} is already {status.value}")
    if task.upstream_task_id is None:
        raise _not_cancellable(
            f"task {task_id} has not been accepted by StarMagic yet; retry in a moment"
        )
    if task.can_cancel is False:
        raise _not_cancellable("StarMagic says this task can no longer be cancelled")
    try:
        snapshot = await client.cancel(task.upstream_task_id)
    except UpstreamCancelUnsupported as exc:
        raise CancelNotSupported(
            "StarMagic does not support cancelling tasks "
            f"(it answered {exc.status_code}); nothing was changed"
        ) from exc
    except UpstreamRejected as exc:
        raise _not_cancellable(f"StarMagic refused to cancel the task: {exc.message}") from exc
    except UpstreamUnavailable as exc:
        raise ServiceUnavailable(
            f"StarMagic is unavailable: {exc.message}", headers={"Retry-After": "5"}
        ) from exc
    log.info("cancel_answered", task_id=task_id, reported=snapshot.status.value)
    async with factory() as session, session.begin():
        applied = await apply_snapshot(
            await session.connection(),
            task_id,
            snapshot,
            now=utcnow(),
            poll_after=timedelta(seconds=settings.reconcile_after_seconds),
        )
    if applied.outcome is Outcome.APPLIED:
        log_transition(applied.state)
    if applied.outcome is Outcome.MISMATCH:
        raise BadGateway(
            f"StarMagic answered the cancel with another task ({snapshot.upstream_id}); "
            "nothing was changed",
            code="task_mismatch",
        )
    return applied
