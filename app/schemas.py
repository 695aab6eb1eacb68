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
from app.models import TaskStatus

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
        return (self.images[0].url or None) if self.images else None
