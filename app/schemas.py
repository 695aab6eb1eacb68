"""API shapes and the typed upstream snapshot (not tables)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from app import model_rules
from app.model_rules import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    TOKEN_SAFE_PROMPT_BYTES,
    FieldError,
    RequestFields,
    normalise_resolution,
)
from app.model_rules import MAX_IMAGE_URLS as MAX_IMAGE_URLS  # re-exported
from app.model_rules import MAX_URL_LENGTH as MAX_URL_LENGTH  # re-exported
from app.models import ImageStatus, TaskStatus

MODELS = KNOWN_MODELS
MAX_PROMPT_BYTES = TOKEN_SAFE_PROMPT_BYTES
MAX_METADATA_BYTES = 4096
# Metadata is returned as given and hashed to recognise replays; a bounded
# shape keeps both (and the database's JSON) far from any recursion limit.
MAX_METADATA_DEPTH = 4
_METADATA_SCALARS = (str, int, float, bool, type(None))


def _unset(value: Any) -> bool:
    # Fields added after the first release are left out of dumps while unset,
    # so an older request's fingerprint (its Idempotency-Key) stays the same.
    return value is None


def storable_text(value: str) -> str:
    """Refuse what a database cannot keep: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def metadata_problem(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Why metadata cannot be kept as given (naming where inside it), or None."""
    where = f"at {path[:200]}" if path else "at the top"
    if isinstance(value, dict | list):
        if depth >= MAX_METADATA_DEPTH:
            limit = f"at most {MAX_METADATA_DEPTH} levels of objects and arrays"
            return f"is nested too deeply {where}: {limit}"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict) and not isinstance(key, str):
                return f"{where}: keys must be strings"
            if isinstance(key, str) and (problem := _text_problem(key)):
                return f"{where}: a key {problem}"
            inner = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
            if problem := metadata_problem(item, inner, depth + 1):
                return problem
        return None
    if not isinstance(value, _METADATA_SCALARS):
        return f"{where}: values must be strings, numbers, booleans, null, objects or arrays"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: numbers must be finite"
    if isinstance(value, str) and (problem := _text_problem(value)):
        return f"{where}: {problem}"
    return None


def _text_problem(value: str) -> str | None:
    try:
        storable_text(value)
    except ValueError as exc:
        return str(exc)
    return None


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
                    "webhook_url": "https://orders.internal.example.net/hooks/imagetasks",
                },
                {
                    "model": "gpt-image-2",
                    "prompt": "A night market in the rain, cinematic",
                    "size": "2048x1152",
                    "quality": "high",
                    "n": 2,
                    "metadata": {"order_id": "A-1043"},
                },
                {
                    "model": "gpt-image-2-beta",
                    "prompt": "A paper boat on a pond, studio photo",
                    "size": "3:2",
                    "resolution": "1K",
                },
            ]
        },
    )

    prompt: str = Field(
        min_length=1, description="What to draw; the length limit depends on the model."
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Which model draws it; each has its own rules (see the README).",
        json_schema_extra={"enum": list(KNOWN_MODELS)},
    )
    size: str | None = Field(default=None, description="A ratio, `auto` or `WxH`, per model.")
    resolution: str | None = Field(
        default=None,
        exclude_if=_unset,
        description="`1K`, `2K` or `4K` (any case) for ratio sizes.",
    )
    quality: str | None = Field(default=None, description="`low`, `medium` or `high`.")
    image_urls: list[str] | None = Field(
        default=None, description="1 to 16 HTTPS reference images for editing."
    )
    mask_url: str | None = Field(
        default=None,
        exclude_if=_unset,
        description="HTTPS PNG whose transparent pixels are redrawn.",
    )
    n: int = Field(
        default=1, strict=True, description="How many images (1 to 10 on gpt-image-2, else 1)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Your own data, returned as given (≤ 4 KiB as JSON, "
        f"≤ {MAX_METADATA_DEPTH} levels deep, scalar leaves).",
    )

    webhook_url: str | None = Field(
        default=None,
        max_length=2000,
        exclude_if=_unset,
        description="Where to POST this task's events, signed with the token's default secret "
        "(GET /webhook-endpoints/default/secret); https://, or http:// inside "
        "WEBHOOK_ALLOWED_NETWORKS.",
    )
    webhook_events: list[str] | None = Field(
        default=None,
        max_length=20,
        exclude_if=_unset,
        description="Event types sent to webhook_url (default: the settled ones: task.failed, "
        "task.cancelled, image.stored, image.failed).",
    )

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if "webhook_url" in info.data and info.data["webhook_url"] is None:
            raise ValueError("needs a webhook_url to send them to")
        from app.services.events import TASK_EVENTS  # the event writer imports this module

        known = [kind.value for kind in TASK_EVENTS]
        if not value:
            raise ValueError("choose at least one event type")
        for kind in value:
            if kind not in known:
                raise ValueError(f"unknown event type {kind!r} (known: {', '.join(known)})")
        return list(dict.fromkeys(value))

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value not in KNOWN_MODELS:
            raise ValueError(f"must be one of {', '.join(KNOWN_MODELS)}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        storable_text(value)
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str | None) -> str | None:
        return None if value is None else normalise_resolution(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if problem := metadata_problem(value):
            raise ValueError(problem)
        if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"is too large: at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _follow_model_rules(
        cls, data: Any, handler: ModelWrapValidatorHandler[TaskCreate]
    ) -> TaskCreate:
        """Apply the model's rules, listing their breaches beside any other field errors."""
        try:
            request = handler(data)
        except ValidationError as exc:
            known = list(exc.errors())
            failed = {str(error["loc"][0]) for error in known if error["loc"]}
            judgeable = model_rules.judgeable_fields(data, failed)
            breaches = model_rules.check(*judgeable) if judgeable else []
            raise _validation_error(exc.title, known, breaches) from None
        if breaches := model_rules.check(request.model, request.rule_fields()):
            raise _validation_error(cls.__name__, [], breaches)
        return request

    def rule_fields(self) -> RequestFields:
        """The fields the model's rules judge."""
        return RequestFields(
            prompt=self.prompt,
            size=self.size,
            resolution=self.resolution,
            quality=self.quality,
            n=self.n,
            image_urls=self.image_urls,
            mask_url=self.mask_url,
        )

    def upstream_body(self) -> dict[str, Any]:
        """The provider's submit body, without the callback URL."""
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt}
        if model_rules.RULES[self.model].sends_n:
            body["n"] = self.n
        for name in ("size", "resolution", "quality", "image_urls", "mask_url"):
            if (value := getattr(self, name)) is not None:
                body[name] = value
        return body


def _validation_error(
    title: str, known: list[ErrorDetails], breaches: list[FieldError]
) -> ValidationError:
    """One ValidationError holding pydantic's own errors and the rules' breaches."""
    details = [
        InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"], ctx=ctx)
        if (ctx := error.get("ctx")) is not None
        else InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])
        for error in known
    ]
    for breach in breaches:
        loc = tuple(int(part) if part.isdigit() else part for part in breach.field.split("."))
        problem = PydanticCustomError("model_rule", "{reason}", {"reason": breach.reason})
        details.append(InitErrorDetails(type=problem, loc=loc, input=None))
    return ValidationError.from_exception_data(title, details)


_TASK_ID = "tsk_01JD3ZQ8W4Y9K2M7N5P6R8S0TV"
_SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class ErrorInfo(BaseModel):
    """Why a task or its image failed."""

    code: str = Field(
        description="A stable, machine-readable reason: the provider's code for a task, "
        "or the download's (`too_large`, `not_an_image`, `blocked_address`, `expired`, "
        "`http_<status>`, …) for an image.",
        examples=["content_policy_violation", "too_large"],
    )
    message: str = Field(
        description="What happened, for people.", examples=["the prompt was refused"]
    )
    retryable: bool | None = Field(
        default=None,
        description="For a failed task: true when the same request is worth resubmitting later "
        "(the provider had a passing problem), false when the request itself must change "
        "(for example a content policy refusal), null when unknown.",
    )


_IMAGE_EXAMPLE: dict[str, Any] = {
    "index": 0,
    "status": "stored",
    "url": f"https://imagetasks.internal/tasks/{_TASK_ID}/image",
    "content_type": "image/png",
    "size_bytes": 1843221,
    "sha256": _SHA256,
    "width": 1024,
    "height": 1536,
    "stored_at": "2025-05-06T10:00:12Z",
    "source_expires_at": "2025-05-07T10:00:05Z",
    "error": None,
}


class ImagePublic(BaseModel):
    """One image of a task as imagetasks keeps it (our copy, not the provider's link)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_IMAGE_EXAMPLE]})

    index: int = Field(
        default=0,
        description="Which of the task's images this is (0 for the first; tasks with `n` > 1 "
        "have several).",
        examples=[0],
    )
    status: ImageStatus = Field(
        description="`pending` while the download is queued or retrying, then `stored` "
        "(final) or `failed` (see `error`; `POST /tasks/{id}/image/retry` queues it again)."
    )
    url: str | None = Field(
        default=None,
        description="Where to GET the stored bytes from this service; null until stored.",
        examples=[f"https://imagetasks.internal/tasks/{_TASK_ID}/image"],
    )
    content_type: str | None = Field(
        default=None,
        description="The type sniffed from the bytes: image/png, image/jpeg or image/webp.",
        examples=["image/png"],
    )
    size_bytes: int | None = Field(
        default=None, description="Size of the stored image in bytes.", examples=[1843221]
    )
    sha256: str | None = Field(
        default=None,
        description="Hex sha256 of the stored bytes (also the image's ETag).",
        examples=[_SHA256],
    )
    width: int | None = Field(default=None, description="Width in pixels.", examples=[1024])
    height: int | None = Field(default=None, description="Height in pixels.", examples=[1536])
    stored_at: datetime | None = Field(
        default=None,
        description="When the image was stored (UTC).",
        examples=["2025-05-06T10:00:12Z"],
    )
    source_expires_at: datetime | None = Field(
        default=None,
        description="When the provider's own link stops working (about 24 h after completion).",
        examples=["2025-05-07T10:00:05Z"],
    )
    error: ErrorInfo | None = Field(
        default=None, description="Why the download failed; null unless `status` is `failed`."
    )


class TaskPublic(BaseModel):
    """One image generation, as callers see it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _TASK_ID,
                    "status": "completed",
                    "progress": 100,
                    "settled": True,
                    "prompt": "A lighthouse at dawn, watercolor",
                    "model": "gpt-image-1.5",
                    "size": "1024x1536",
                    "quality": "medium",
                    "image_urls": None,
                    "metadata": {"order_id": "A-1042"},
                    "upstream_task_id": "task-unified-1757165031-uyujaw3d",
                    "error": None,
                    "usage": {
                        "billing_rule": "per_call",
                        "credits_reserved": 2.5,
                        "user_group": "default",
                    },
                    "can_cancel": False,
                    "image": _IMAGE_EXAMPLE,
                    "images": [_IMAGE_EXAMPLE],
                    "created_at": "2025-05-06T09:59:40Z",
                    "updated_at": "2025-05-06T10:00:12Z",
                    "completed_at": "2025-05-06T10:00:05Z",
                }
            ]
        }
    )

    id: str = Field(description="The task's id, ours (sortable by creation).", examples=[_TASK_ID])
    status: TaskStatus = Field(
        description="`submitting` → `pending` → `processing` → `completed`, `failed` or "
        "`cancelled` (the last three are final; a task never moves backwards)."
    )
    progress: int = Field(
        description="Percent done as the provider last reported it (0 to 100).", examples=[100]
    )
    settled: bool = Field(
        default=False,
        description="Nothing more will happen to it: failed, cancelled, or completed with "
        "every image stored or failed (until a failed image is retried).",
        examples=[True],
    )
    prompt: str = Field(description="The prompt as submitted.", examples=["A lighthouse at dawn"])
    model: str = Field(description="The provider's model.", examples=["gpt-image-1.5"])
    size: str | None = Field(
        description="Requested size or aspect ratio; null for the provider's default.",
        examples=["1024x1536"],
    )
    quality: str | None = Field(
        description="Requested quality; null for the provider's default.", examples=["medium"]
    )
    resolution: str | None = Field(
        default=None,
        description="Requested resolution, for the models that take one; null otherwise.",
        examples=["2k"],
    )
    n: int = Field(default=1, description="How many images were asked for.", examples=[1])
    image_urls: list[str] | None = Field(
        description="Reference images for editing, as submitted; null for none.",
        examples=[None],
    )
    mask_url: str | None = Field(
        default=None, description="The editing mask, as submitted; null for none."
    )
    metadata: dict[str, Any] = Field(
        description="The caller's own data, returned exactly as given.",
        examples=[{"order_id": "A-1042"}],
    )
    upstream_task_id: str | None = Field(
        description="The provider's id for the task; null until the provider accepted it.",
        examples=["task-unified-1757165031-uyujaw3d"],
    )
    can_cancel: bool | None = Field(
        default=None,
        description="Whether the provider says the task can still be cancelled; null if unsaid.",
    )
    usage: dict[str, Any] | None = Field(
        default=None, description="What the provider reports the task cost, as it reports it."
    )
    error: ErrorInfo | None = Field(
        description="Why the task failed or was cancelled; null otherwise."
    )
    image: ImagePublic | None = Field(
        description="The first (usually only) image; null until the task is completed."
    )
    images: list[ImagePublic] = Field(
        default_factory=list,
        description="Every image of the task, by `index` (one unless `n` > 1).",
    )
    created_at: datetime = Field(
        description="When the task was created (UTC).", examples=["2025-05-06T09:59:40Z"]
    )
    updated_at: datetime = Field(
        description="When anything about it last changed (UTC).",
        examples=["2025-05-06T10:00:12Z"],
    )
    completed_at: datetime | None = Field(
        description="When the provider finished it (UTC); null until then.",
        examples=["2025-05-06T10:00:05Z"],
    )


class TaskPage(BaseModel):
    """One page of tasks, newest first."""

    items: list[TaskPublic] = Field(description="At most `limit` tasks, newest first.")
    next_cursor: str | None = Field(
        description="Pass back as `cursor` for the next page; null on the last page.",
        examples=["WyIyMDI1LTA1LTA2VDA5OjU5OjQwKzAwOjAwIiwgInRzayJd"],
    )


class ErrorBody(BaseModel):
    """The one error shape of the whole API."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "image_urls[2]: Input should be a valid string",
                        "details": [
                            {"field": "image_urls[2]", "reason": "Input should be a valid string"}
                        ],
                    }
                }
            ]
        }
    )

    error: ErrorDetail = Field(description="What went wrong.")


class ErrorDetail(BaseModel):
    """An error: a stable code, a message for people, and for 422 each field's reason."""

    code: str = Field(
        description="Stable and machine-readable: `invalid_request`, `invalid_json`, "
        "`unauthorized`, `not_found`, `image_not_stored`, `image_missing`, "
        "`idempotency_in_flight`, `provider_refused`, `provider_unavailable`, "
        "`database_unavailable`, `schema_not_current`, `storage_unavailable`, …",
        examples=["invalid_request"],
    )
    message: str = Field(
        description="What happened and what to do, for people.",
        examples=["prompt: must not be blank"],
    )
    details: list[dict[str, Any]] | None = Field(
        default=None,
        description="For validation errors: one `{field, reason}` per problem; field paths "
        "read like `metadata.order` or `image_urls[2]`.",
        examples=[[{"field": "prompt", "reason": "must not be blank"}]],
    )


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
        return (self.images[0].url or None) if self.images else None
