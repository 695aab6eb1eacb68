"""The SQL tables: tasks (which are also the download and poll queues),
callback deliveries and idempotency records."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both databases (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


class TaskStatus(enum.StrEnum):
    SUBMITTING = "submitting"
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def rank(self) -> int:
        """Position on the one-way road; all terminal states share the last rank."""
        return min(_ORDER.index(self), 3)


_ORDER = list(TaskStatus)
TERMINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class ImageStatus(enum.StrEnum):
    PENDING = "pending"
    STORED = "stored"
    FAILED = "failed"


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Task(SQLModel, table=True):
    """One image generation, from the caller's request to the stored image."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_created", "created_at", "id"),
        Index("ix_tasks_status_created", "status", "created_at", "id"),
        Index("ix_tasks_image_status_created", "image_status", "created_at", "id"),
        Index("ix_tasks_next_poll_at", "next_poll_at"),
        Index("ix_tasks_image_next_attempt_at", "image_status", "image_next_attempt_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    status: str = Field(max_length=16)
    progress: int = 0
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    model: str = Field(max_length=64)
    size: str | None = Field(default=None, max_length=16)
    quality: str | None = Field(default=None, max_length=16)
    image_urls: list[str] | None = Field(default=None, sa_column=Column(JSON))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON))
    owner: str = Field(max_length=64)
    upstream_task_id: str | None = Field(default=None, max_length=128, unique=True)
    estimated_time: int | None = None
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    submit_outcome_unknown: bool = False

    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    completed_at: datetime | None = _ts()
    last_event_at: datetime | None = _ts()

    # Reconciler queue: a non-terminal task is polled when next_poll_at passes.
    next_poll_at: datetime | None = _ts()
    poll_attempts: int = 0
    poll_lease_until: datetime | None = _ts()

    # Download queue and the stored copy.
    image_status: str | None = Field(default=None, max_length=16)
    image_source_url: str | None = Field(default=None, sa_column=Column(Text))
    image_source_expires_at: datetime | None = _ts()
    image_renewed: bool = False
    image_attempts: int = 0
    image_next_attempt_at: datetime | None = _ts()
    image_lease_owner: str | None = Field(default=None, max_length=64)
    image_lease_until: datetime | None = _ts()
    image_key: str | None = Field(default=None, max_length=255)
    image_content_type: str | None = Field(default=None, max_length=32)
    image_size_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    image_sha256: str | None = Field(default=None, max_length=64)
    image_width: int | None = None
    image_height: int | None = None
    image_stored_at: datetime | None = _ts()
    image_error_code: str | None = Field(default=None, max_length=64)
    image_error_message: str | None = Field(default=None, sa_column=Column(Text))


class CallbackDelivery(SQLModel, table=True):
    """Every accepted webhook delivery, duplicates included, and what it did."""

    __tablename__ = "callback_deliveries"

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(foreign_key="tasks.id", index=True, max_length=40)
    body_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    upstream_status: str | None = Field(default=None, max_length=16)
    outcome: str = Field(max_length=16)
    changed: bool = False
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class IdempotencyRecord(SQLModel, table=True):
    """A caller's Idempotency-Key, bound to the request it first came with."""

    __tablename__ = "idempotency_records"

    owner: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=255)
    request_sha256: str = Field(max_length=64)
    task_id: str = Field(foreign_key="tasks.id", max_length=40)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
