"""Every knob of the service, read once from the environment (and `.env`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SettingsError(Exception):
    """A setting that cannot work; the message is one line for the operator."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]

# Shown as "***" by repr(), str() and rich: tracebacks and debug prints must not leak them.
SECRET_FIELDS = frozenset({"starmagic_api_key", "webhook_secret", "api_tokens"})
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


class Settings(BaseSettings):
    """The environment table of DESIGN.md, plus a few operational extras."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./var/imagetasks.db"
    storage_url: str = "file://./var/images"
    starmagic_base_url: str = "https://api.starmagic.ai"
    starmagic_api_key: str = ""
    public_base_url: str = ""
    webhook_secret: CsvList = Field(default_factory=list)
    api_tokens: CsvList = Field(default_factory=list)
    auth_disabled: bool = False
    max_image_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    reconcile_interval_seconds: float = Field(default=30, gt=0)
    reconcile_after_seconds: float = Field(default=120, gt=0)
    confirm_callbacks: bool = True
    allow_insecure_callbacks: bool = False
    download_allow_private_networks: bool = False
    allowed_models: CsvList = Field(
        default_factory=lambda: ["gpt-image-1.5", "gpt-image-2", "gpt-image-2-beta"]
    )

    # Operational extras, not part of DESIGN's table but documented in .env.example.
    run_background: bool = True
    download_concurrency: int = Field(default=4, ge=1, le=64)
    image_redirect: bool = False
    submit_unknown_after_seconds: float = Field(default=3600, gt=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    root_path: str = ""
    trusted_proxies: CsvList = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    callback_retention_days: float = Field(default=30, gt=0)
    idempotency_retention_days: float = Field(default=7, gt=0)

    @field_validator(
        "webhook_secret", "api_tokens", "trusted_proxies", "allowed_models", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme in ("sqlite", "postgresql", "postgres"):
            hint = "sqlite+aiosqlite" if scheme == "sqlite" else "postgresql+asyncpg"
            raise ValueError(f"use an async driver: {hint}://…")
        if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "file" and (parts.netloc or parts.path):
            return value
        if parts.scheme == "s3" and parts.netloc:
            return value
        raise ValueError("must be file://<directory> or s3://<bucket>[/prefix]")

    @field_validator("starmagic_base_url", "public_base_url")
    @classmethod
    def _origin(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and (
            urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc
        ):
            raise ValueError("must be an http(s) URL")
        return value

    @field_validator("allowed_models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        from app.schemas import MODELS

        unknown = [model for model in value if model not in MODELS]
        if unknown or not value:
            raise ValueError(f"must list some of {', '.join(MODELS)} (unknown: {unknown})")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if not self.webhook_secret:
            raise ValueError("WEBHOOK_SECRET is required (it signs the callback URLs)")
        if any(len(secret) < 16 for secret in self.webhook_secret):
            raise ValueError("WEBHOOK_SECRET: every secret needs at least 16 characters")
        if not self.public_base_url:
            raise ValueError("PUBLIC_BASE_URL is required (the provider calls back there)")
        if self.public_base_url.startswith("http://") and not self.allow_insecure_callbacks:
            raise ValueError(
                "PUBLIC_BASE_URL must be https:// "
                "(set ALLOW_INSECURE_CALLBACKS=true for local tests)"
            )
        if not self.api_tokens and not self.auth_disabled:
            raise ValueError("API_TOKENS is required (or AUTH_DISABLED=true, for local use only)")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name in SECRET_FIELDS and value:
                value = "***"
            elif name == "database_url":
                value = _URL_PASSWORD.sub(r"\1***@", value)
            yield name, value

    @property
    def signing_secret(self) -> str:
        """The secret that signs new callback URLs; the others only verify."""
        return self.webhook_secret[0]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation failure into a one-line reason."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]).upper()
        reason = str(error["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"{field}: {reason}" if field else reason) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    return load_settings()


class DatabaseSettings(BaseSettings):
    """Just DATABASE_URL: enough to migrate without the service's secrets."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = Settings.model_fields["database_url"].default
