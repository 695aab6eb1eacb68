"""Logging a dependency outage as a story, not as a traceback per attempt.

One line when it starts, a summary with the count of failures at most every
`summary_seconds` while it lasts, one line when it ends. A different kind of
failure (the database comes back unmigrated) starts a new story.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.schema_version import schema_status

log = structlog.get_logger(__name__)

SUMMARY_SECONDS = 30.0
# An outage ends at the first success after this long without a failure: when writes
# fail (a full disk) while reads succeed, each success must not end the story.
SETTLE_SECONDS = 5.0
PROBE_TIMEOUT = 3.0
UNREACHABLE = "unreachable"
SCHEMA = "schema_not_current"


@dataclass(frozen=True)
class Diagnosis:
    """Why the database failed: `UNREACHABLE` (passing) or `SCHEMA` (needs a migration)."""

    kind: str
    reason: str


def _lost_connection(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError):  # ConnectionError is an OSError
        return True
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, InterfaceError)
    )


def _missing_schema(exc: BaseException) -> bool:
    """A statement that failed because a table, column or named index does not exist
    (SQLite, PostgreSQL)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    if any(f"no such {thing}" in text for thing in ("table", "column", "index")):
        return True
    return "does not exist" in text and ("relation" in text or "column" in text)


async def diagnose_database_error(engine: AsyncEngine, exc: BaseException) -> Diagnosis | None:
    """Classify a failed database operation; None when it is neither outage nor schema (a bug).

    Only a statement that failed for a missing table, column or index costs a look at
    `alembic_version` (to tell an unmigrated database from a bug); lost connections
    and busy databases are not probed: the probe would only wait on the same server.
    """
    if not isinstance(exc, DBAPIError | OSError | TimeoutError):
        return None
    reason = short_reason(exc)
    if _lost_connection(exc):
        return Diagnosis(UNREACHABLE, reason)
    if _missing_schema(exc):
        try:
            status = await asyncio.wait_for(schema_status(engine), PROBE_TIMEOUT)
        except Exception:  # the probe cannot connect either: the database is down
            return Diagnosis(UNREACHABLE, reason)
        if not status.current:
            return Diagnosis(SCHEMA, status.describe())
    if isinstance(exc, OperationalError):  # locked, out of connections, shutting down...
        return Diagnosis(UNREACHABLE, reason)
    return None


def short_reason(exc: BaseException) -> str:
    """The first line of the driver's message, prefixed by the exception's name."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {detail[0][:200]}" if detail else type(exc).__name__


class OutageLog:
    """The state of one dependency as seen by one caller (a loop, or the request path)."""

    def __init__(
        self,
        dependency: str,
        *,
        summary_seconds: float = SUMMARY_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        self.dependency = dependency
        self._summary_seconds = summary_seconds
        self._settle_seconds = settle_seconds
        self._clock = clock
        self._context = context
        self.kind: str | None = None  # None while healthy
        self._started = 0.0
        self._last_failure = 0.0
        self._last_summary = 0.0
        self._failures = 0
        self._since_summary = 0

    @property
    def active(self) -> bool:
        return self.kind is not None

    def failed(self, kind: str, reason: str, *, repeat: bool = True) -> None:
        """Record one failure; logs only when the outage starts or a summary is due.

        `repeat=False` is for states that cannot heal by themselves (an unmigrated
        schema): logged once when they start, with no periodic summary.
        """
        now = self._clock()
        self._last_failure = now
        if kind != self.kind:
            if self.kind is not None:
                self._ended(now)
            self.kind, self._started, self._last_summary = kind, now, now
            self._failures, self._since_summary = 1, 0
            log.error(
                f"{self.dependency}_outage_started", kind=kind, reason=reason, **self._context
            )
            return
        self._failures += 1
        self._since_summary += 1
        if repeat and now - self._last_summary >= self._summary_seconds:
            log.warning(
                f"{self.dependency}_outage_continues",
                kind=kind,
                reason=reason,
                failures=self._since_summary,
                failures_total=self._failures,
                seconds=round(now - self._started, 1),
                **self._context,
            )
            self._last_summary, self._since_summary = now, 0

    def recovered(self) -> None:
        """Record a success; logs the end of an outage if there was one and it has settled
        (no failure for `settle_seconds`)."""
        if self.kind is None:
            return
        now = self._clock()
        if now - self._last_failure >= self._settle_seconds:
            self._ended(now)
            self.kind = None

    def _ended(self, now: float) -> None:
        log.info(
            f"{self.dependency}_outage_ended",
            kind=self.kind,
            failures=self._failures,
            seconds=round(now - self._started, 1),
            **self._context,
        )
