"""Every knob of the service, read once from the environment (and `.env`)."""

from __future__ import annotations

import io
import ipaddress
import logging
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SettingsError(Exception):
    """Settings that cannot work: one line per problem, each naming its variable."""

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]

# Shown as "***" by repr(), str() and rich: tracebacks and debug prints must not leak them.
SECRET_FIELDS = frozenset({"starmagic_api_key", "webhook_secret", "api_tokens"})
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
MIN_SECRET_LENGTH = 16
# Its unparsable lines are reported with the other problems, not by python-dotenv.
logging.getLogger("dotenv.main").setLevel(logging.ERROR)
_S = TypeVar("_S", bound=BaseSettings)
# Read from the working directory, as UTF-8, under the real environment variables.
ENV_FILE = ".env"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# Hosts reserved for documentation (RFC 2606): a URL on one is a copied example.
_EXAMPLE_DOMAINS = ("example.com", "example.net", "example.org")
# Words that mark a value as a template's stand-in rather than a real secret.
_PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "changethis", "replace-me")


def _check_database_url(value: str) -> str:
    scheme = urlsplit(value).scheme
    if scheme in ("sqlite", "postgresql", "postgres"):
        hint = "sqlite+aiosqlite" if scheme == "sqlite" else "postgresql+asyncpg"
        raise ValueError(f"use an async driver: {hint}://…")
    if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
    return value


def _is_placeholder(value: str) -> bool:
    lowered = value.lower()
    return any(word in lowered for word in _PLACEHOLDER_WORDS)


def _on_example_domain(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in _EXAMPLE_DOMAINS)


class Settings(BaseSettings):
    """The environment table of DESIGN.md, plus a few operational extras.

    Every check is a field validator, so one load reports every problem at once.
    Fields that another check reads (the opt-ins) come before the fields they govern.
    """

    model_config = SettingsConfigDict(env_file=ENV_FILE, extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./var/imagetasks.db"
    storage_url: str = "file://./var/images"
    starmagic_base_url: str = "https://api.starmagic.ai"
    starmagic_api_key: str = Field(default="", validate_default=True)
    allow_insecure_callbacks: bool = False
    public_base_url: str = Field(default="", validate_default=True)
    webhook_secret: CsvList = Field(default_factory=list, validate_default=True)
    auth_disabled: bool = False
    api_tokens: CsvList = Field(default_factory=list, validate_default=True)
    max_image_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    reconcile_interval_seconds: float = Field(default=30, gt=0)
    reconcile_after_seconds: float = Field(default=120, gt=0)
    confirm_callbacks: bool = True
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
    event_retention_days: float = Field(default=30, gt=0)
    # Outbound webhooks to callers.
    webhook_allowed_networks: CsvList = Field(default_factory=list)
    webhook_retry_schedule: CsvList = Field(
        default_factory=lambda: ["0", "5", "300", "1800", "7200", "18000", "36000", "36000"]
    )
    webhook_timeout_seconds: float = Field(default=15, gt=0, le=60)
    webhook_disable_after_seconds: float = Field(default=5 * 24 * 3600, gt=0)
    webhook_secret_grace_seconds: float = Field(default=24 * 3600, ge=0)
    webhook_concurrency: int = Field(default=8, ge=1, le=128)
    webhook_max_endpoints: int = Field(default=20, ge=1, le=1000)
    # The operator console at /console (internal side only: see the nginx example).
    console_enabled: bool = True
    console_session_hours: float = Field(default=12, gt=0, le=24 * 30)

    @field_validator(
        "webhook_secret",
        "api_tokens",
        "trusted_proxies",
        "allowed_models",
        "webhook_allowed_networks",
        "webhook_retry_schedule",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return _check_database_url(value)

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "file" and (parts.netloc or parts.path):
            return value
        if parts.scheme == "s3" and parts.netloc:
            return value
        raise ValueError("must be file://<directory> or s3://<bucket>[/prefix]")

    @field_validator("starmagic_base_url")
    @classmethod
    def _origin(cls, value: str) -> str:
        value = value.rstrip("/")
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
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

    @field_validator("starmagic_api_key")
    @classmethod
    def _api_key(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is required: every submission would fail without it")
        if _is_placeholder(value):
            raise ValueError("is a placeholder; set the key StarMagic gave you")
        return value.strip()

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().rstrip("/")
        if not value:
            raise ValueError("is required: StarMagic calls back there")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL")
        if parts.query or parts.fragment or value.endswith(("?", "#")):
            # Callback URLs are this value plus a path: a query or fragment would swallow it.
            raise ValueError("no query (?) or fragment (#): an origin and an optional path only")
        if parts.username is not None or parts.password is not None:
            raise ValueError("no user or password in the URL: an origin and an optional path only")
        if any(char.isspace() for char in value):
            raise ValueError("no spaces: an origin and an optional path only")
        try:
            parts.port  # noqa: B018  # raises for a port out of range or not a number
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if _on_example_domain(value):
            raise ValueError(
                f"{parts.hostname} is the example's placeholder; set the public HTTPS origin "
                "StarMagic can reach"
            )
        if parts.scheme == "http" and not info.data.get("allow_insecure_callbacks", True):
            raise ValueError("must be https:// (set ALLOW_INSECURE_CALLBACKS=true for local tests)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("is required: it signs the callback URLs")
        if any(len(secret) < MIN_SECRET_LENGTH for secret in value):
            raise ValueError(f"every secret needs at least {MIN_SECRET_LENGTH} characters")
        if any(_is_placeholder(secret) for secret in value):
            raise ValueError("is a placeholder; generate one (e.g. openssl rand -hex 32)")
        return value

    @field_validator("api_tokens")
    @classmethod
    def _api_tokens(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value and not info.data.get("auth_disabled", True):
            raise ValueError("is required (or AUTH_DISABLED=true, for local use only)")
        if any(_is_placeholder(token) for token in value):
            raise ValueError("holds a placeholder; generate tokens (e.g. openssl rand -hex 24)")
        if any(len(token) < MIN_SECRET_LENGTH for token in value):
            # A short token is guessable, and the log redactor would blank every
            # occurrence of its letters in every line ("tok" in "token", "tasks"...).
            raise ValueError(
                f"every token needs at least {MIN_SECRET_LENGTH} characters "
                "(e.g. openssl rand -hex 24)"
            )
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith("/"):
            raise ValueError(f"must start with a slash (/{value}), not {value!r}")
        value = value.rstrip("/")
        if "//" in value or any(char.isspace() or char in "?#" for char in value):
            raise ValueError(f"must be a path like /imagetasks, not {value!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        bad = []
        for entry in value:
            if entry == "*":  # uvicorn's "trust everyone"
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                bad.append(entry)
        if bad:
            raise ValueError(f"not IP addresses or networks: {', '.join(repr(b) for b in bad)}")
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _webhook_networks(cls, value: list[str]) -> list[str]:
        from app.webhooks.policy import parse_allowed

        parse_allowed(value)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _webhook_schedule(cls, value: list[str], info: ValidationInfo) -> list[str]:
        try:
            delays = [float(item) for item in value]
        except ValueError:
            raise ValueError(f"must be seconds separated by commas, not {value!r}") from None
        if not delays or any(delay < 0 or delay != delay for delay in delays):
            raise ValueError("must list one or more delays of 0 seconds or more")
        retention = info.data.get("event_retention_days")
        if retention is not None and sum(delays) >= retention * 86400:
            # An event (and its delivery) must outlive the delivery's whole schedule.
            raise ValueError(
                f"spans {sum(delays) / 86400:g} days, longer than EVENT_RETENTION_DAYS "
                f"({retention:g}); keep events longer or shorten the schedule"
            )
        return value

    @property
    def webhook_delays(self) -> list[float]:
        """Seconds before each delivery attempt: the first, then each retry."""
        return [float(item) for item in self.webhook_retry_schedule]

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


def _problem_line(error: ErrorDetails) -> str:
    field = ".".join(str(part) for part in error["loc"]).upper()
    reason = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}: {reason}" if field else reason


def check_env_file(path: str = ENV_FILE) -> None:
    """SettingsError (one line) if `.env` exists but is not UTF-8 text, as the loader needs."""
    _env_file_text(path)


def _env_file_text(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""  # missing (fine) or unreadable: the loader skips it as it would
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SettingsError(
            [
                f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                "save it as UTF-8"
            ]
        ) from None


def _env_file_problems(path: str = ENV_FILE) -> list[str]:
    """A line of `.env` that does not parse loses its setting: one problem per such line.

    The line's text is not shown: it may hold a secret.
    """
    from dotenv.parser import parse_stream

    text = _env_file_text(path)
    return [
        f"{path} line {binding.original.line}: cannot be parsed (NAME=value, quotes closed); "
        "its setting is ignored"
        for binding in parse_stream(io.StringIO(text))
        if binding.error
    ]


def _load(factory: Callable[[], _S]) -> _S:
    """Build settings, reporting `.env`'s unparsable lines with every other problem."""
    problems = _env_file_problems()
    try:
        settings = factory()
    except ValidationError as exc:
        problems += [_problem_line(error) for error in exc.errors()]
    if problems:
        raise SettingsError(problems)
    return settings


def load_settings(**overrides: object) -> Settings:
    """Build the settings; SettingsError lists every problem, one line each."""
    return _load(lambda: Settings(**overrides))  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    return load_settings()


class DatabaseSettings(BaseSettings):
    """Just DATABASE_URL: enough to migrate without the service's secrets."""

    model_config = SettingsConfigDict(env_file=ENV_FILE, extra="ignore")

    database_url: str = Settings.model_fields["database_url"].default

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return _check_database_url(value)


def load_database_settings() -> DatabaseSettings:
    """Just DATABASE_URL; SettingsError (one line) when it cannot work."""
    return _load(DatabaseSettings)
