"""Plain async factories for rows the tests need."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Task, utcnow
from app.services.tasks import new_task_id


async def make_task(session: AsyncSession, *, status: str = "pending", **fields: Any) -> Task:
    """Insert a task in the given state (committed)."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_task_id(),
        "status": status,
        "prompt": "a test prompt",
        "model": "gpt-image-1.5",
        "owner": "tests",
        "upstream_task_id": f"task-unified-1757156493-{secrets.token_hex(4)}",
        "created_at": now,
        "updated_at": now,
        "next_poll_at": now + timedelta(seconds=120),
    }
    values.update(fields)
    task = Task(**values)
    session.add(task)
    await session.commit()
    return task
