"""Domain errors carry their HTTP status; one set of handlers renders every
error, ours and the framework's, in the same JSON shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.outage import SCHEMA, UNREACHABLE, OutageLog, diagnose_database_error

log = structlog.get_logger(__name__)


class DomainError(Exception):
    """An error a caller can act on; subclasses fix the status and code."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = details
        self.headers = headers


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Unauthorized(DomainError):
    status_code = 401
    code = "unauthorized"


class Conflict(DomainError):
    status_code = 409
    code = "conflict"


class Unprocessable(DomainError):
    status_code = 422
    code = "invalid_request"


class PayloadTooLarge(DomainError):
    status_code = 413
    code = "payload_too_large"


class BadGateway(DomainError):
    status_code = 502
    code = "provider_refused"


class ServiceUnavailable(DomainError):
    status_code = 503
    code = "provider_unavailable"


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error shape: {"error": {"code", "message", "details"?}}."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status_code, headers=headers)


_LOCATIONS = ("body", "query", "path", "header", "cookie")


def field_path(location: Sequence[str | int]) -> str:
    """One spelling of a field everywhere: names joined by dots, list indices in brackets.

    ``("body", "image_urls", 2)`` is ``image_urls[2]``; ``("query", "limit")`` is ``limit``.
    """
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors():
        location = list(error.get("loc", ()))
        if location and location[0] in _LOCATIONS:
            location = location[1:]
        reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if not location and error.get("type") == "missing":
            reason = "is empty: send a JSON object"
        elif not location and error.get("type") in ("model_attributes_type", "dict_type"):
            reason = f"must be a JSON object, not {_json_kind(error.get('input'))}"
        details.append({"field": field_path(location) or "body", "reason": reason})
    return details


def _json_kind(value: object) -> str:
    """What a JSON value is, with its article: "an array", "a string", ..."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _json_syntax_error(exc: RequestValidationError) -> str | None:
    """Where the body stops being JSON ("line 3, column 7: ..."), if that is the problem."""
    for error in exc.errors():
        if error.get("type") != "json_invalid":
            continue
        location = error.get("loc", ())
        position = location[-1] if location and isinstance(location[-1], int) else 0
        document = exc.body if isinstance(exc.body, str) else ""
        line = document.count("\n", 0, position) + 1
        column = position - (document.rfind("\n", 0, position) + 1) + 1
        cause = (error.get("ctx") or {}).get("error") or "JSON decode error"
        return f"the body is not valid JSON: {cause} at line {line}, column {column}"
    return None


def _not_json_content_type(request: Request, exc: RequestValidationError) -> str | None:
    """What the request said of a body FastAPI would not parse as JSON, if that is the problem."""
    declared = request.headers.get("content-type", "")
    media_type = declared.split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return None
    about_the_body = [e for e in exc.errors() if tuple(e.get("loc", ())) == ("body",)]
    if not media_type:
        # Without a Content-Type, FastAPI hands the raw bytes on: a body was sent, untyped.
        sent_bytes = any(isinstance(e.get("input"), bytes) for e in about_the_body)
        return "sent no Content-Type" if sent_bytes else None
    return f"said {media_type}" if about_the_body else None


def install_error_handlers(app: FastAPI, database_outage: OutageLog | None = None) -> None:
    """Route every error through the one shape.

    `database_outage` is shared with the process's background loops, which see the
    database recover; the request path only ever sees it fail.
    """
    app.state.database_outage = database_outage or OutageLog("database")

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        media_type = _not_json_content_type(request, exc)
        if media_type is not None:
            return error_response(
                415,
                "unsupported_media_type",
                f"the body must be JSON sent with `Content-Type: application/json` "
                f"(this request {media_type})",
            )
        syntax = _json_syntax_error(exc)
        if syntax is not None:
            return error_response(422, "invalid_json", syntax)
        details = _field_errors(exc)
        first = details[0] if details else {"field": "body", "reason": "invalid"}
        message = f"{first['field']}: {first['reason']}"
        return error_response(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI decodes JSON bodies as UTF-8 (RFC 8259), whatever charset is declared.
            cause = exc.__cause__
            return error_response(
                422,
                "invalid_json",
                f"the body is not valid JSON: it is not UTF-8 text (byte "
                f"0x{cause.object[cause.start]:02x} at offset {cause.start}); send it as UTF-8",
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(ConnectionError)
    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # A database that cannot be reached, or that was never migrated, is not a
        # bug: say what it is, so that callers (and the provider) retry, and log
        # it as one outage rather than a traceback per request.
        runtime = request.app.state.runtime
        diagnosis = await diagnose_database_error(runtime.engine, exc)
        if diagnosis is None:
            return await _unexpected(request, exc)
        outage: OutageLog = request.app.state.database_outage
        if diagnosis.kind == SCHEMA:
            outage.failed(SCHEMA, diagnosis.reason, repeat=False)
            return error_response(
                503,
                "schema_not_current",
                f"the database is not ready: {diagnosis.reason}",
                headers={"Retry-After": "30"},
            )
        outage.failed(UNREACHABLE, diagnosis.reason)
        return error_response(
            503,
            "database_unavailable",
            "the database is unavailable; try again shortly",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return error_response(500, "internal_error", "internal error; see the service logs")
