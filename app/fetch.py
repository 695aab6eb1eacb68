"""Download an image link without letting the link reach inside the network or fill the disk.

`SafeFetcher` checks the URL and every redirect target, connects only through the
address guard (`app.netguard`), and streams the body into a file (`app.fetch_save`).
Every refusal is a `FetchError` with a stable code.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path

import anyio
import httpx

from app.fetch_errors import FetchError, map_errors, refused, status_error
from app.fetch_save import FetchResult, save_image
from app.netguard import (
    GuardError,
    Resolver,
    SystemResolver,
    address_allowed,
    check_host,
    guarded_transport,
)

__all__ = [
    "FetchError",
    "FetchResult",
    "Resolver",
    "SafeFetcher",
    "SystemResolver",
    "address_allowed",
]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class SafeFetcher:
    """One per process: downloads image links into local files, safely and bounded."""

    def __init__(
        self,
        *,
        allow_private: bool,
        max_bytes: int,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_redirects: int = 3,
        total_timeout: float = 600,
        resolver: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.total_timeout = total_timeout
        transport = guarded_transport(
            resolver or SystemResolver(),
            allow_private=allow_private,
            ssl_context=ssl_context or httpx.create_ssl_context(),
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            follow_redirects=False,
            trust_env=False,
            # Identity only: a compressed body could inflate far beyond what was counted.
            headers={
                "User-Agent": "imagetasks",
                "Accept": "image/png, image/jpeg, image/webp",
                "Accept-Encoding": "identity",
            },
            # Links must not set cookies that a later download would send along.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()

    def check_url(self, url: str | httpx.URL) -> httpx.URL:
        """Parse `url` and refuse what may never be fetched (FetchError bad_url/blocked_address).

        Hostnames are checked again at connect time, against what they resolve to.
        """
        try:
            parsed = httpx.URL(url) if isinstance(url, str) else url
        except (httpx.InvalidURL, TypeError) as exc:
            raise FetchError("bad_url", f"not a URL: {exc}") from exc
        schemes = ("https", "http") if self.allow_private else ("https",)
        if parsed.scheme not in schemes:
            raise FetchError("bad_url", f"scheme {parsed.scheme!r} is not allowed")
        if parsed.userinfo:
            raise FetchError("bad_url", "credentials in the URL are not allowed")
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise FetchError("bad_url", "the URL has no host")
        try:
            check_host(host, allow_private=self.allow_private)
        except GuardError as exc:
            raise refused(exc) from exc
        return parsed

    async def fetch_to_file(
        self,
        url: str,
        dest: Path,
        *,
        on_progress: Callable[[], Awaitable[None]] | None = None,
    ) -> FetchResult:
        """Stream the image at `url` into `dest`, synced to disk; FetchError on any refusal.

        `dest` is removed again when the download fails (`local_io` if it cannot be
        written). `on_progress` is awaited every few MB or seconds, e.g. to renew a lease;
        what it raises propagates.
        """
        try:
            with anyio.fail_after(self.total_timeout):
                return await self._fetch(url, dest, on_progress)
        except BaseException as exc:
            # One unlink, done synchronously so it also happens while being cancelled.
            dest.unlink(missing_ok=True)  # noqa: ASYNC240
            if isinstance(exc, TimeoutError):
                raise FetchError("timeout", "the download took too long", retryable=True) from exc
            if isinstance(exc, OSError):  # network errors are mapped already: this is dest
                raise FetchError("local_io", f"cannot write {dest}: {exc}", retryable=True) from exc
            raise

    async def _fetch(
        self, url: str, dest: Path, on_progress: Callable[[], Awaitable[None]] | None
    ) -> FetchResult:
        current = self.check_url(url)
        for _ in range(self.max_redirects + 1):
            with map_errors():
                async with self._client.stream("GET", current) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        current = self.check_url(_join(current, response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise status_error(response)
                    return await save_image(
                        response, dest, max_bytes=self.max_bytes, on_progress=on_progress
                    )
        raise FetchError("too_many_redirects", f"more than {self.max_redirects} redirects")


def _join(base: httpx.URL, location: str) -> httpx.URL:
    try:
        return base.join(location)
    except httpx.InvalidURL as exc:
        raise FetchError("bad_url", f"bad redirect location: {exc}") from exc
