"""API shapes and the typed upstream snapshot (not tables)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.models import TaskStatus

MODELS = ("gpt-image-1.5", "gpt-image-2", "gpt-image-2-beta")
SIZES = ("1:1", "2:3", "3:2", "1024x1024", "1024x1536", "1536x1024")
QUALITIES = ("low", "medium", "high")
# The provider counts 2000 tokens; a token is at least one character and
# rarely more than three UTF-8 bytes, so 6000 bytes stays safely inside it.
MAX_PROMPT_BYTES = 6000
MAX_IMAGE_URLS = 16
MAX_URL_LENGTH = 2048
MAX_METADATA_BYTES = 4096


def storable_text(value: str) -> str:
    """Refuse what a database cannot keep: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _storable_json(value: Any) -> None:
    if isinstance(value, str):
        storable_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable_text(str(key))
            _storable_json(item)
    elif isinstance(value, list):
        for item in value:
            _storable_json(item)


class TaskCreate(BaseModel):
    """What a caller may ask for; everything the provider would refuse is refused here."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "A lighthouse at dawn, watercolor",
                    "size": "1024x1536",
                    "quality": "medium",
                    "metadata": {"order_id": "A-1042"},
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, description="What to draw; at most 6000 UTF-8 bytes.")
    model: Literal["gpt-image-1.5", "gpt-image-2", "gpt-image-2-beta"] = "gpt-image-1.5"
    size: Literal["1:1", "2:3", "3:2", "1024x1024", "1024x1536", "1536x1024"] | None = None
    quality: Literal["low", "medium", "high"] | None = None
    image_urls: list[str] | None = Field(
        default=None, description="1 to 16 HTTPS reference images for editing."
    )
    resolution: str | None = None
    n: int = 1
    mask_url: str | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Your own data, returned as given (≤ 4 KiB as JSON)."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        storable_text(value)
        if not value.strip():
            raise ValueError("must not be blank")
        if len(value.encode()) > MAX_PROMPT_BYTES:
            raise ValueError(f"is too long: at most {MAX_PROMPT_BYTES} UTF-8 bytes")
        return value

    @field_validator("image_urls")
    @classmethod
    def _image_urls(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not 1 <= len(value) <= MAX_IMAGE_URLS:
            raise ValueError(f"must hold 1 to {MAX_IMAGE_URLS} URLs")
        for url in value:
            storable_text(url)
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise ValueError(f"must be https:// URLs: {url[:100]!r}")
            if len(url) > MAX_URL_LENGTH:
                raise ValueError(f"URLs must be at most {MAX_URL_LENGTH} characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        _storable_json(value)
        if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"is too large: at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    @field_validator("n")
    @classmethod
    def _n_for_model(cls, value: int, info: ValidationInfo) -> int:
        model = info.data.get("model")
        limit = 10 if model == "gpt-image-2" else 1
        if not 1 <= value <= limit:
            raise ValueError(f"must be 1 to {limit} for {model}")
        return value

    def upstream_body(self) -> dict[str, Any]:
        """The provider's submit body, without the callback URL."""
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "n": self.n}
        for name in ("size", "quality", "resolution", "image_urls", "mask_url"):
            if (value := getattr(self, name)) is not None:
                body[name] = value
        return body


class ErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool | None = Field(
        default=None,
        description="For a failed task: true when the same request is worth resubmitting later "
        "(the provider had a passing problem), false when the request itself must change "
        "(for example a content policy refusal), null when unknown.",
    )


class ImagePublic(BaseModel):
    index: int = 0
    status: str
    url: str | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    stored_at: datetime | None = None
    source_expires_at: datetime | None = None
    error: ErrorInfo | None = None


class TaskPublic(BaseModel):
    id: str
    status: str
    progress: int
    prompt: str
    model: str
    size: str | None
    quality: str | None
    resolution: str | None = None
    n: int = 1
    image_urls: list[str] | None
    mask_url: str | None = None
    metadata: dict[str, Any]
    upstream_task_id: str | None
    can_cancel: bool | None = None
    usage: dict[str, Any] | None = None
    error: ErrorInfo | None
    image: ImagePublic | None
    images: list[ImagePublic] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class TaskPage(BaseModel):
    items: list[TaskPublic]
    next_cursor: str | None


class ErrorBody(BaseModel):
    """The one error shape of the whole API."""

    error: ErrorDetail


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


ErrorBody.model_rebuild()


@dataclass(frozen=True, slots=True)
class SnapshotImage:
    """One finished image as the provider lists it: its link, and when the link dies if said."""

    url: str
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One typed view of the provider's task, from a callback, a query or a submit answer."""

    status: TaskStatus
    upstream_id: str | None = None
    progress: int | None = None
    images: tuple[SnapshotImage, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    estimated_time: int | None = None
    completed_at: datetime | None = None
    can_cancel: bool | None = None
    usage: dict[str, Any] | None = None

    @property
    def image_url(self) -> str | None:
        """The first image's link (most tasks have exactly one)."""
        return self.images[0].url if self.images else None
