"""The StarMagic client: submit, query, and parsing of its loose payloads."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import structlog

from app import metrics
from app.models import TaskStatus
from app.schemas import Snapshot, SnapshotImage

log = structlog.get_logger(__name__)

# The provider's image links (and so any hope of fetching an image) last this long.
LINK_LIFETIME = timedelta(hours=24)


def link_expiry(claimed: datetime | None, start: datetime, now: datetime) -> datetime:
    """When a link stops working: the provider's own expiry while it is still ahead (but
    never more than a link lifetime from now), else the lifetime counted from `start`."""
    if claimed is None or claimed <= now:
        return start + LINK_LIFETIME
    return min(claimed, now + LINK_LIFETIME)


DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=5.0)


class UpstreamError(Exception):
    """Something went wrong talking to StarMagic; `message` keeps its reason."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "upstream_error",
        status_code: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.retry_after = retry_after  # seconds, when the provider said (Retry-After)


class UpstreamRejected(UpstreamError):
    """The provider answered and refused (4xx): sending again will not help."""


class UpstreamNotFound(UpstreamRejected):
    """The provider does not know the task."""


class UpstreamCancelUnsupported(UpstreamRejected):
    """The provider has no cancel route (it answered 404 or 405)."""


class UpstreamUnavailable(UpstreamError):
    """The provider could not be reached or asked us to come back later."""


class UpstreamOutcomeUnknown(UpstreamError):
    """The submit may have reached the provider; it must never be re-sent."""


class SnapshotError(ValueError):
    """A payload that is not a task snapshot."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded, jittered retries; tests use zero delays."""

    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 20.0

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)


@contextmanager
def _timed(operation: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.PROVIDER_SECONDS.labels(operation=operation).observe(time.perf_counter() - started)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError):
            return None


# The code the provider publishes for each status of a refused submission,
# kept when the body of the refusal names none.
SUBMIT_STATUS_CODES = {
    400: "invalid_parameters",
    401: "unauthorized",
    402: "quota_exceeded",
    403: "permission_denied",
    422: "invalid_parameters",
    429: "rate_limit_exceeded",
}


def provider_reason(
    response: httpx.Response, codes: dict[int, str] | None = None
) -> tuple[str, str]:
    """The provider's own error code and message, whatever shape it used; without a
    code in the body, the one `codes` gives for the status, else `http_<status>`."""
    status = response.status_code
    code = (codes or {}).get(status, f"http_{status}")
    message = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return code, text[:300] or message
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        code = str(error.get("code") or error.get("type") or code)
        message = str(error.get("message") or error.get("detail") or message)
    elif isinstance(error, str):
        message = error
    return code[:64], message[:500]


class StarMagicClient:
    """StarMagic over one shared httpx.AsyncClient."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._retry = retry or RetryPolicy()

    async def submit(self, body: dict[str, Any]) -> Snapshot:
        """Create a task upstream; retried only when the provider cannot have seen it."""
        url = f"{self._base}/v1/images/generations"
        for attempt in range(self._retry.attempts):
            last_try = attempt + 1 == self._retry.attempts
            try:
                with _timed("submit"):
                    response = await self._http.post(url, json=body, headers=self._headers)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # No connection was made, so nothing was sent: safe to try again.
                if last_try:
                    raise UpstreamUnavailable(f"cannot reach StarMagic: {exc!r}") from exc
                await asyncio.sleep(self._retry.backoff(attempt))
                continue
            except httpx.TransportError as exc:
                raise UpstreamOutcomeUnknown(
                    f"no answer from StarMagic after sending ({type(exc).__name__})",
                    code="submission_outcome_unknown",
                ) from exc
            if response.status_code in (429, 503):
                asked = _retry_after(response)
                delay = self._retry.backoff(attempt) if asked is None else asked
                if not last_try and delay <= self._retry.max_retry_after:
                    await asyncio.sleep(delay)
                    continue
                code, message = provider_reason(response, SUBMIT_STATUS_CODES)
                raise UpstreamUnavailable(
                    message, code=code, status_code=response.status_code, retry_after=asked
                )
            return self._submitted(response)
        raise AssertionError("unreachable: the loop returns or raises")

    def _submitted(self, response: httpx.Response) -> Snapshot:
        status = response.status_code
        if 400 <= status < 500:
            # A client error: the provider looked at the request and did not take it.
            code, message = provider_reason(response, SUBMIT_STATUS_CODES)
            raise UpstreamRejected(message, code=code, status_code=status)
        if status >= 500:
            # 500, 502, 504…: the provider (or a gateway in front of it) may well have
            # created the task before failing; only 503 says "not now" (handled above).
            code, message = provider_reason(response)
            raise UpstreamOutcomeUnknown(
                f"StarMagic answered {status} ({message}); the task may exist",
                code="submission_outcome_unknown",
                status_code=status,
            )
        try:
            snapshot = parse_snapshot(response.json())
        except (ValueError, SnapshotError) as exc:
            raise UpstreamOutcomeUnknown(
                f"StarMagic accepted the task but its answer is unreadable: {exc}",
                code="submission_outcome_unknown",
            ) from exc
        if not snapshot.upstream_id:
            raise UpstreamOutcomeUnknown(
                "StarMagic's answer has no task id", code="submission_outcome_unknown"
            )
        return snapshot

    async def query(self, upstream_id: str) -> Snapshot:
        """The provider's current view of a task, with jittered retries."""
        url = f"{self._base}/v1/tasks/{upstream_id}"
        error: UpstreamError = UpstreamUnavailable("no attempt made")
        for attempt in range(self._retry.attempts):
            if attempt:
                await asyncio.sleep(self._retry.backoff(attempt - 1))
            try:
                with _timed("query"):
                    response = await self._http.get(url, headers=self._headers)
            except httpx.TransportError as exc:
                error = UpstreamUnavailable(f"cannot reach StarMagic: {type(exc).__name__}")
                continue
            if response.status_code == 429 or response.status_code >= 500:
                code, message = provider_reason(response)
                error = UpstreamUnavailable(message, code=code, status_code=response.status_code)
                continue
            if response.status_code >= 400:
                code, message = provider_reason(response)
                kind = UpstreamNotFound if response.status_code == 404 else UpstreamRejected
                raise kind(message, code=code, status_code=response.status_code)
            try:
                return parse_snapshot(response.json())
            except (ValueError, SnapshotError) as exc:
                error = UpstreamUnavailable(f"unreadable task from StarMagic: {exc}")
        raise error

    async def cancel(self, upstream_id: str) -> Snapshot:
        """Ask the provider to cancel a task (`DELETE /v1/tasks/{id}`, an unpublished draft).

        UpstreamCancelUnsupported when the provider has no such route (404/405),
        UpstreamRejected when it refuses this task (400), UpstreamUnavailable otherwise.
        """
        url = f"{self._base}/v1/tasks/{upstream_id}"
        try:
            with _timed("cancel"):
                response = await self._http.delete(url, headers=self._headers)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"cannot reach StarMagic: {type(exc).__name__}") from exc
        status = response.status_code
        if status in (404, 405):
            code, message = provider_reason(response)
            raise UpstreamCancelUnsupported(message, code=code, status_code=status)
        if 400 <= status < 500 and status != 429:
            code, message = provider_reason(response)
            raise UpstreamRejected(message, code=code, status_code=status)
        if status >= 400:
            code, message = provider_reason(response)
            raise UpstreamUnavailable(message, code=code, status_code=status)
        try:
            snapshot = parse_snapshot(response.json())
        except (ValueError, SnapshotError) as exc:
            raise UpstreamUnavailable(f"unreadable cancel answer from StarMagic: {exc}") from exc
        return snapshot


def _unix(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
        return datetime.fromtimestamp(seconds, UTC) if 0 < seconds < 2**33 else None
    except (ValueError, OverflowError, OSError):
        return None


_UPSTREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MAX_ESTIMATED_TIME = 7 * 24 * 3600


def _text(value: Any, limit: int) -> str | None:
    """Provider text made storable: no NUL, no lone surrogates, bounded."""
    if value is None or value == "":
        return None
    text = str(value).replace("\x00", "")[:limit]
    return text.encode("utf-8", "replace").decode("utf-8") or None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _bounded(value: int | None, low: int, high: int) -> int | None:
    return value if value is not None and low <= value <= high else None


MAX_IMAGES = 16


def _url_of(value: Any) -> str | None:
    """An image link given as a string, or as a list whose first string is the link."""
    if isinstance(value, list):
        value = next((item for item in value if isinstance(item, str)), None)
    return _text(value, 4096) if isinstance(value, str) else None


def _image(item: Any) -> SnapshotImage:
    """One entry of a link list; one without a usable link keeps its place, link-less."""
    if isinstance(item, dict):
        return SnapshotImage(_url_of(item.get("url")) or "", _unix(item.get("expires_at")))
    return SnapshotImage(_url_of(item) or "")


def _images(task: dict[str, Any]) -> tuple[SnapshotImage, ...]:
    """Every image link, from the published `results` or the enveloped `result.images`.

    Positions are the provider's: an unusable entry stays as a link-less image, so
    a later answer (a renewal) lines up with the same images.
    """
    for entries in (task.get("results"), _nested_images(task.get("result"))):
        if isinstance(entries, str):
            entries = [entries]
        if isinstance(entries, list):
            found = tuple(_image(item) for item in entries[:MAX_IMAGES])
            if any(image.url for image in found):
                return found
    return ()


def _nested_images(result: Any) -> Any:
    return result.get("images") if isinstance(result, dict) else None


def _finite(number: float) -> bool:
    """A number a float can hold (JSON integers may be far larger: they overflow)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _usage(value: Any) -> dict[str, Any] | None:
    """What the provider says about billing, kept only in its known, scalar fields."""
    if not isinstance(value, dict):
        return None
    usage: dict[str, Any] = {}
    for name in ("billing_rule", "user_group"):
        if (text := _text(value.get(name), 64)) is not None:
            usage[name] = text
    credits = value.get("credits_reserved")
    if isinstance(credits, int | float) and not isinstance(credits, bool) and _finite(credits):
        usage["credits_reserved"] = credits
    return usage or None


def _error(error: Any) -> tuple[str | None, str | None]:
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = error.get("message") or error.get("detail")
        return _text(code, 64), _text(message, 1000)
    if isinstance(error, str):
        return None, _text(error, 1000)
    return None, None


def parse_snapshot(payload: Any) -> Snapshot:
    """One typed snapshot from either shape the provider uses.

    The published shape is a bare task object with `results: [url, …]`; the
    enveloped one is `{"code", "data": {…, "result": {"images": [{"url", "expires_at"}]}}}`.
    Unknown fields are ignored; a link may be a string or a list of strings.
    """
    if not isinstance(payload, dict):
        raise SnapshotError("expected a JSON object")
    data = payload.get("data")
    task: dict[str, Any] = data if isinstance(data, dict) else payload
    code = _int(payload.get("code")) if task is not payload else None
    if code is not None and code != 200:
        raise SnapshotError(f"envelope carries code {code}")
    raw_status = task.get("status")
    try:
        status = TaskStatus(raw_status) if isinstance(raw_status, str) else None
    except ValueError:
        status = None
    if status is None or status is TaskStatus.SUBMITTING:
        raise SnapshotError(f"unknown task status {str(raw_status)[:40]!r}")
    upstream_id = task.get("id")
    if upstream_id is not None and (
        not isinstance(upstream_id, str) or not _UPSTREAM_ID.fullmatch(upstream_id)
    ):
        raise SnapshotError("task id must be a short string of letters, digits and -_.:")
    progress = _int(task.get("progress"))
    images = _images(task) if status is TaskStatus.COMPLETED else ()
    error_code, error_message = _error(task.get("error"))
    info = task.get("task_info")
    estimated = task.get("estimated_time")
    if estimated is None and isinstance(info, dict):
        estimated = info.get("estimated_time")
    can_cancel = info.get("can_cancel") if isinstance(info, dict) else None
    return Snapshot(
        status=status,
        upstream_id=upstream_id or None,
        progress=None if progress is None else max(0, min(100, progress)),
        images=images,
        error_code=error_code,
        error_message=error_message,
        estimated_time=_bounded(_int(estimated), 0, MAX_ESTIMATED_TIME),
        completed_at=_unix(task.get("completed")),
        can_cancel=can_cancel if isinstance(can_cancel, bool) else None,
        usage=_usage(task.get("usage") if task is payload else payload.get("usage")),
    )
