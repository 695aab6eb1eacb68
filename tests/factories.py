"""Plain async factories for rows the tests need."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Image, Task, utcnow
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


async def make_image(
    session: AsyncSession, task_id: str, position: int = 0, **fields: Any
) -> Image:
    """Insert one image of a task (committed); pending and due unless told otherwise."""
    now = utcnow()
    values: dict[str, Any] = {
        "task_id": task_id,
        "position": position,
        "status": "pending",
        "source_url": f"https://cdn.example.com/{task_id}-{position}.png",
        "source_expires_at": now + timedelta(hours=23),
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    image = Image(**values)
    session.add(image)
    await session.commit()
    return image
