"""`FetchError`, and how network, guard and HTTP failures become one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from app.netguard import BadURLError, GuardError


class FetchError(Exception):
    """A download that failed; `code` is stable and machine-readable."""

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = False,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def renew_link(self) -> bool:
        """True when the link itself was refused (403/404/410): ask the provider for a new one."""
        return self.status_code in (403, 404, 410)


def refused(exc: GuardError) -> FetchError:
    """The guard's refusal as `bad_url` or `blocked_address`."""
    return FetchError("bad_url" if isinstance(exc, BadURLError) else "blocked_address", str(exc))


@contextmanager
def map_errors() -> Iterator[None]:
    """Raise transport failures and the guard's refusals as FetchError."""
    try:
        yield
    except GuardError as exc:
        raise refused(exc) from exc
    except httpx.TimeoutException as exc:
        raise FetchError("timeout", str(exc) or type(exc).__name__, retryable=True) from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise FetchError("bad_url", str(exc)) from exc
    except httpx.TransportError as exc:
        raise FetchError("connection", str(exc) or type(exc).__name__, retryable=True) from exc


# A server may ask for any delay; nothing past a day is of use to a 24-hour link.
MAX_RETRY_AFTER_SECONDS = 86_400.0


def _retry_after(value: str | None) -> float | None:
    delay = _parse_retry_after(value)
    return None if delay is None else min(delay, MAX_RETRY_AFTER_SECONDS)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():  # "²".isdigit() holds too
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def status_error(response: httpx.Response) -> FetchError:
    """An answer other than 200 or a redirect, as `http_<status>`."""
    status = response.status_code
    return FetchError(
        f"http_{status}",
        f"the image link answered {status}",
        retryable=status >= 500 or status in (408, 429),
        status_code=status,
        retry_after=_retry_after(response.headers.get("retry-after")),
    )
