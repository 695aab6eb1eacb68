"""The SQL tables: tasks (which are also the poll queue), their images (which
are the download queue), callback deliveries, idempotency records and the
event log."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
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


# The tasks a callback asked to confirm: all that ix_tasks_confirm_due holds.
_CONFIRM_REQUESTED = text("confirm_requested_at IS NOT NULL")


class Task(SQLModel, table=True):
    """One image generation, from the caller's request to the stored images."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_created", "created_at", "id"),
        Index("ix_tasks_status_created", "status", "created_at", "id"),
        Index("ix_tasks_image_status_created", "image_status", "created_at", "id"),
        Index("ix_tasks_next_poll_at", "next_poll_at"),
        # The confirmation claim's own: straight to the tasks a callback asked about,
        # not through every routine poll due before them (an outage's backlog).
        Index(
            "ix_tasks_confirm_due",
            "next_poll_at",
            postgresql_where=_CONFIRM_REQUESTED,
            sqlite_where=_CONFIRM_REQUESTED,
        ),
        # The console's overview: what completed, failed and was stored in a window.
        Index("ix_tasks_completed_at", "completed_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    status: str = Field(max_length=16)
    progress: int = 0
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    model: str = Field(max_length=64)
    size: str | None = Field(default=None, max_length=16)
    quality: str | None = Field(default=None, max_length=16)
    resolution: str | None = Field(default=None, max_length=8)
    n: int = 1
    image_urls: list[str] | None = Field(default=None, sa_column=Column(JSON))
    mask_url: str | None = Field(default=None, sa_column=Column(Text))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON))
    owner: str = Field(max_length=64)
    upstream_task_id: str | None = Field(default=None, max_length=128, unique=True)
    estimated_time: int | None = None
    # What the provider last said: whether it would still cancel, and what it bills.
    can_cancel: bool | None = None
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
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
    # When the latest poll was claimed: queries are spaced from it, and it tells
    # which confirmation requests that poll's answer can settle.
    poll_claimed_at: datetime | None = _ts()
    # A terminal callback's request for a confirmation query, until a poll
    # claimed after it answers (None: nothing is waiting).
    confirm_requested_at: datetime | None = _ts()

    # All of the task's images at a glance (for filters): pending until every
    # image is settled, then stored when all are stored, else failed.
    image_status: str | None = Field(default=None, max_length=16)
    # When the last task.processing event was written: progress events are throttled.
    progress_event_at: datetime | None = _ts()
    # The caller's per-task webhook and the event types it wants, as `,a,b,` (None: none).
    webhook_url: str | None = Field(default=None, sa_column=Column(Text))
    webhook_events: str | None = Field(default=None, sa_column=Column(Text))
    # When webhook_url answered 410 Gone: nothing more is queued for it.
    webhook_gone_at: datetime | None = _ts()


class Image(SQLModel, table=True):
    """One image of a completed task: its provider link, download state and stored copy.

    The table is the download queue: a pending image is claimed with a lease.
    """

    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_status_next_attempt", "status", "next_attempt_at"),
        Index("ix_images_stored_at", "stored_at"),
    )

    task_id: str = Field(foreign_key="tasks.id", primary_key=True, max_length=40)
    position: int = Field(primary_key=True)
    status: str = Field(max_length=16)
    source_url: str | None = Field(default=None, sa_column=Column(Text))
    source_expires_at: datetime | None = _ts()
    renewed: bool = False
    attempts: int = 0
    next_attempt_at: datetime | None = _ts()
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = _ts()
    key: str | None = Field(default=None, max_length=255)
    content_type: str | None = Field(default=None, max_length=32)
    size_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    sha256: str | None = Field(default=None, max_length=64)
    width: int | None = None
    height: int | None = None
    stored_at: datetime | None = _ts()
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class CallbackDelivery(SQLModel, table=True):
    """Every accepted webhook delivery, duplicates included, and what it did."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (Index("ix_callback_deliveries_received_at", "received_at"),)

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
    # Retention reaches the expired records by age, oldest first: the key says nothing
    # of it.
    __table_args__ = (Index("ix_idempotency_records_created_at", "created_at"),)

    owner: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=255)
    request_sha256: str = Field(max_length=64)
    task_id: str = Field(foreign_key="tasks.id", max_length=40)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Event(SQLModel, table=True):
    """One change a caller cares about, with the task as it was shown at that moment.

    Readers follow the log in (`txid`, `seq`) order: `seq` is insertion order,
    and on PostgreSQL `txid` (the writing transaction, set by the database) lets
    a reader serve only events of transactions that have ended, so a cursor
    never passes an event that commits late. On SQLite `txid` stays 0.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_order", "txid", "seq"),
        Index("ix_events_owner_order", "owner", "txid", "seq"),
        Index("ix_events_task", "task_id", "seq"),
        Index("ix_events_created_at", "created_at"),
        # SQLite: never reuse a seq, even once retention has emptied the table.
        {"sqlite_autoincrement": True},
    )

    seq: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    id: str = Field(max_length=32, unique=True)
    type: str = Field(max_length=32)
    task_id: str = Field(max_length=40)
    owner: str = Field(max_length=64)
    txid: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class WebhookEndpoint(SQLModel, table=True):
    """A caller's standing subscription: where its events go, signed with its secret."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_owner", "owner", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    owner: str = Field(max_length=64)
    url: str = Field(sa_column=Column(Text, nullable=False))
    # The event types it wants, as `,a,b,` so one LIKE finds the subscribers of a type.
    event_types: str = Field(sa_column=Column(Text, nullable=False))
    description: str | None = Field(default=None, sa_column=Column(Text))
    enabled: bool = Field(default=True, sa_column=Column(Boolean, nullable=False))
    disabled_reason: str | None = Field(default=None, max_length=32)
    secret: str = Field(max_length=64)
    # Secrets replaced by rotations, newest first, each signing too until its grace
    # period ends: [{"secret": ..., "until": ISO 8601}] (a few at most).
    previous_secrets: list[dict[str, str]] | None = Field(default=None, sa_column=Column(JSON))
    # Since when every delivery has failed (None: the last one succeeded).
    failing_since: datetime | None = _ts()
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class WebhookDelivery(SQLModel, table=True):
    """The outbox: one event bound for one target (an endpoint, or the task's own URL).

    Claimed with a lease like a download; of one task's deliveries to one target
    only the oldest pending one is ever claimable, so they arrive in order.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "target"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_order", "task_id", "target", "id"),
        Index("ix_webhook_deliveries_target", "target", "status", "created_at"),
        Index("ix_webhook_deliveries_created_at", "created_at"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    event_id: str = Field(max_length=32)
    task_id: str = Field(max_length=40)
    owner: str = Field(max_length=64)
    # An endpoint's id, or "task" for the task's own webhook_url.
    target: str = Field(max_length=40)
    status: str = Field(max_length=16)
    attempts: int = 0
    next_attempt_at: datetime | None = _ts()
    lease_owner: str | None = Field(default=None, max_length=96)
    lease_until: datetime | None = _ts()
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    delivered_at: datetime | None = _ts()
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class WebhookAttempt(SQLModel, table=True):
    """One try at a delivery: when, what came back, how long it took."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        Index("ix_webhook_attempts_delivery", "delivery_id", "id"),
        Index("ix_webhook_attempts_at", "attempted_at"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    delivery_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    attempted_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    status_code: int | None = None
    duration_ms: int = 0
    error: str | None = Field(default=None, sa_column=Column(Text))


class TaskActivity(SQLModel, table=True):
    """What the service did about a task that no other table keeps: the answer to its
    submission, each download attempt's outcome and each query to the provider.

    Written in the transaction that records the outcome; pruned with the callback
    deliveries (CALLBACK_RETENTION_DAYS).
    """

    __tablename__ = "task_activity"
    __table_args__ = (
        Index("ix_task_activity_task", "task_id", "id"),
        Index("ix_task_activity_at", "at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    task_id: str = Field(max_length=40)
    # "submit" (StarMagic's answer), "download" (position set) or "query" (a
    # confirmation or a reconciler poll).
    kind: str = Field(max_length=16)
    position: int | None = None
    outcome: str = Field(max_length=64)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class ConsoleSignOut(SQLModel, table=True):
    """A console session ended by its operator before it expired: its cookie no longer
    opens the console on any replica. Kept until the session would have expired."""

    __tablename__ = "console_sign_outs"
    __table_args__ = (Index("ix_console_sign_outs_expires_at", "expires_at"),)

    session_id: str = Field(primary_key=True, max_length=32)
    caller: str = Field(max_length=64)
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    signed_out_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
