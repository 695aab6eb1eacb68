"""Shared dependencies: the runtime, the request's session, and bearer auth."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.config import Settings
from app.db import single_read, statement_commits
from app.errors import NotFound, Unauthorized
from app.runtime import Runtime

# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a
# thread pool, a needless hop on every request.


async def get_runtime(request: Request) -> Runtime:
    """The process's runtime, built by the lifespan."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    """The request's unit of work: committed on success, rolled back on error."""
    async with runtime.sessions.begin() as session:
        yield session


# scope="function": commit before answering, so a 2xx always means "recorded".
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_connection(runtime: RuntimeDep) -> AsyncIterator[AsyncConnection]:
    """A plain connection for Core statements (the webhook's hot path), same rules."""
    async with runtime.engine.begin() as connection:
        yield connection


ConnectionDep = Annotated[AsyncConnection, Depends(get_connection, scope="function")]


async def get_callback_connection(runtime: RuntimeDep) -> AsyncIterator[AsyncConnection]:
    """The webhook's connection: statements that stand alone commit on their own
    (PostgreSQL), saving the BEGIN and COMMIT round trips (`app.db.statement_commits`)."""
    async with statement_commits(runtime.engine) as connection:
        yield connection


CallbackConnectionDep = Annotated[
    AsyncConnection, Depends(get_callback_connection, scope="function")
]


async def get_read_connection(runtime: RuntimeDep) -> AsyncIterator[AsyncConnection]:
    """A connection for a read that is one statement (a listing page): no transaction
    around it, so no BEGIN and COMMIT round trips (`app.db.single_read`)."""
    async with single_read(runtime.engine) as connection:
        yield connection


ReadConnectionDep = Annotated[AsyncConnection, Depends(get_read_connection, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="One of the service's API_TOKENS.")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="imagetasks"'}


def caller_id(token: str) -> str:
    """A stable, non-secret name for the caller: scopes its idempotency keys."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


async def require_caller(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's id, after a constant-time check of its bearer token."""
    if settings.auth_disabled:
        return "anonymous"
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token", headers=_CHALLENGE)
    presented = credentials.credentials.encode()
    valid = False
    for token in settings.api_tokens:
        valid |= hmac.compare_digest(token.encode(), presented)
    if not valid:
        raise Unauthorized("invalid bearer token", headers=_CHALLENGE)
    return caller_id(credentials.credentials)


CallerDep = Annotated[str, Depends(require_caller)]

TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


async def task_id_path(
    task_id: Annotated[
        str,
        Path(
            description="The task's id, as POST /tasks gave it.",
            examples=["tsk_01JDZ6SZ0000000000000000AB"],
        ),
    ],
) -> str:
    """A task id from the path; one that could never exist is 404 before any SQL."""
    if not TASK_ID.fullmatch(task_id):
        raise NotFound(f"task {task_id[:64]!r} does not exist")
    return task_id


TaskIdDep = Annotated[str, Depends(task_id_path)]
