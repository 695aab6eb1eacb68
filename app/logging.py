"""Structured logs: JSON lines in production, readable in a terminal.

Every line, uvicorn's access log included, passes the redactor, so callback
tokens, bearer tokens and the configured secrets never reach the log. An
exception is rendered as a plain traceback (file, line, code) in every format,
never with its frames' local variables, and that text is redacted too.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from structlog.types import EventDict, Processor

from app.config import Settings

_CALLBACK_TOKEN = re.compile(r"(/webhooks/starmagic/[^/\s\"?]+/)[^/\s\"?]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
# Webhook signing secrets (`whsec_` + base64), whoever's they are.
_SIGNING_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
# Any of the three above, looser: one scan tells most values there is nothing to hide.
_MAYBE_SECRET = re.compile(r"whsec_|/webhooks/starmagic/|bearer", re.IGNORECASE)
_SECRET_KEYS = ("authorization", "api_key", "token", "secret", "password")
# Field names come from the code, so few: each is judged once.
_secret_key_seen: dict[str, bool] = {}


def redact_text(text: str) -> str:
    """Hide callback tokens, bearer credentials and signing secrets in free text."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    text = _SIGNING_SECRET.sub("***", text)
    return _BEARER.sub(r"\1***", _CALLBACK_TOKEN.sub(r"\1***", text))


def _is_secret_key(key: str) -> bool:
    secret = _secret_key_seen.get(key)
    if secret is None:
        secret = any(word in key.lower() for word in _SECRET_KEYS)
        if len(_secret_key_seen) < 4096:
            _secret_key_seen[key] = secret
    return secret


def _redact(_: Any, __: str, event: EventDict) -> EventDict:
    for key, value in list(event.items()):
        if _is_secret_key(key):
            event[key] = "***"
        elif isinstance(value, str):
            event[key] = redact_text(value)
        elif isinstance(value, tuple | list):
            event[key] = type(value)(redact_text(v) if isinstance(v, str) else v for v in value)
    return event


def _redact_rendered(_: Any, __: str, event: EventDict) -> EventDict:
    # The text the formatter itself made (tracebacks, stacks): the fields were
    # redacted already, before the line reached any handler.
    for key in ("exception", "stack"):
        value = event.get(key)
        if isinstance(value, str):
            event[key] = redact_text(value)
    return event


def _redact_values(secrets: list[str]) -> Processor:
    """Replace the literal secret values wherever they appear in a rendered line."""
    known = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def redact(_: Any, __: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if isinstance(value, str):
                for secret in known:
                    value = value.replace(secret, "***")
                event[key] = value
        return event

    return redact


def _render_stdlib_message(_: Any, __: str, event: EventDict) -> EventDict:
    # uvicorn's access log formats its message from args; render it, then redact.
    record = event.get("_record")
    if record is not None and record.args:
        event["event"] = record.getMessage()
        event.pop("positional_args", None)
    return event


def configure_logging(settings: Settings) -> None:
    """Route structlog and the standard library (uvicorn) through one pipeline."""
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _render_stdlib_message,
        # Here, not in the formatter: every handler on the root logger gets the line
        # redacted, not only ours. Once per line: the formatter only adds tracebacks.
        _redact,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        # plain_traceback: rich's default shows every frame's locals, secrets included.
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text first (no locals), so the redactors see them.
            structlog.processors.format_exc_info,
            structlog.processors.StackInfoRenderer(),
            _redact_rendered,
            _redact_values(
                [*settings.webhook_secret, *settings.api_tokens, settings.starmagic_api_key]
            ),
            renderer,
        ],
    )
    # The standard library looks up each record's calling frame; no renderer here shows it.
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # Undo whatever an earlier dictConfig (uvicorn's own) did to these loggers.
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.disabled = False
        logger.setLevel(logging.NOTSET)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # "setup plugin …" at INFO whenever the migration scripts are first read (readiness).
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def uvicorn_log_config() -> dict[str, Any]:
    """Keep uvicorn from installing its own handlers over ours."""
    return {"version": 1, "disable_existing_loggers": False}
