"""Console sessions ended by sign-out, shared by every replica through the database.

A session cookie is valid on its signature and expiry alone; signing out records
the session's id so a copy of the cookie (another tab, a replayed request, a
second replica) is refused too. A row is kept only until that session would have
expired, so the table stays as small as the number of recent sign-outs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.models import ConsoleSignOut

SIGN_OUTS = ConsoleSignOut.__table__  # type: ignore[attr-defined]


async def is_signed_out(engine: AsyncEngine, session_id: str) -> bool:
    """Whether this session was ended by a sign-out."""
    async with engine.connect() as db:
        found = await db.scalar(
            select(SIGN_OUTS.c.session_id).where(SIGN_OUTS.c.session_id == session_id)
        )
    return found is not None


async def sign_out(
    engine: AsyncEngine, session_id: str, caller: str, expires_at: int, now: datetime
) -> None:
    """End this session everywhere; forget sign-outs of sessions that expired since."""
    async with engine.begin() as db:
        await db.execute(delete(SIGN_OUTS).where(SIGN_OUTS.c.expires_at < now))
        if await db.scalar(
            select(SIGN_OUTS.c.session_id).where(SIGN_OUTS.c.session_id == session_id)
        ):
            return
        try:
            async with db.begin_nested():
                await db.execute(
                    insert(SIGN_OUTS).values(
                        session_id=session_id,
                        caller=caller,
                        expires_at=datetime.fromtimestamp(expires_at, UTC),
                        signed_out_at=now,
                    )
                )
        except IntegrityError:
            pass  # a second sign-out of the same session, on another replica, came first
