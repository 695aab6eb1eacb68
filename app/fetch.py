"""Download an image link without letting the link reach inside the network or fill the disk.

Every TCP connection goes through `_GuardedBackend`: the host is resolved once, every
address is checked, and the socket is opened to a checked address, so a DNS answer
cannot change between the check and the connect (rebinding). TLS still verifies and
sends SNI for the hostname, because httpcore passes it to `start_tls` separately.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Protocol

import anyio
import httpcore
import httpx

from app.images import SNIFF_BYTES, ImageKind, NotAnImageError, read_dimensions, sniff

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A last label that is a number makes the host an IPv4 address in inet_aton/WHATWG
# terms (2130706433, 0x7f.1, 127.1); only the canonical dotted quad is accepted.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_WRITE_BUFFER = 1 << 20
_PROGRESS_BYTES = 4 << 20
_PROGRESS_SECONDS = 5.0


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


@dataclass(frozen=True)
class FetchResult:
    """What was downloaded into the destination file."""

    size_bytes: int
    sha256: str
    content_type: str
    extension: str
    width: int
    height: int
    final_url: str


class Resolver(Protocol):
    """Turns a hostname into the IP addresses a connection may use."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The operating system's resolver, off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """All distinct addresses for `host`, in the resolver's order."""
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        teredo = ip.teredo
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None
        embedded = [ip.ipv4_mapped, ip.sixtofour, nat64, *(teredo or ())]
        if any(v4 is not None and not _is_public(v4) for v4 in embedded):
            return False
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """Whether a connection to this IP address is permitted."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if allow_private:
        # Local testing reaches loopback and LAN hosts, never cloud metadata or multicast.
        ip = getattr(ip, "ipv4_mapped", None) or ip
        return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified)
    return _is_public(ip)


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
        raise FetchError("bad_url", f"non-canonical numeric host {host!r}")
    return None


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, resolver: Resolver, *, allow_private: bool) -> None:
        self._resolver = resolver
        self._allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def _addresses(self, host: str, port: int, limit: float | None) -> list[str]:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return [host]
        except ValueError:
            pass
        try:
            with anyio.fail_after(limit):
                addresses = await self._resolver.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        return addresses

    async def connect_tcp(  # httpcore's signature, timeout included
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port, timeout)
        for address in addresses:
            if not address_allowed(address, allow_private=self._allow_private):
                raise FetchError("blocked_address", f"{host} resolves to {address}")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, backend: httpcore.AsyncNetworkBackend, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx 0.28 cannot be given a network backend: replacing the pool it built is
        # the only way to route every connection (redirects included) through the check.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=50,
            max_keepalive_connections=10,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


@contextmanager
def _map_errors() -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise FetchError("timeout", str(exc) or type(exc).__name__, retryable=True) from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise FetchError("bad_url", str(exc)) from exc
    except httpx.TransportError as exc:
        raise FetchError("connection", str(exc) or type(exc).__name__, retryable=True) from exc


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _status_error(response: httpx.Response) -> FetchError:
    status = response.status_code
    return FetchError(
        f"http_{status}",
        f"the image link answered {status}",
        retryable=status >= 500 or status in (408, 429),
        status_code=status,
        retry_after=_retry_after(response.headers.get("retry-after")),
    )


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
        backend = _GuardedBackend(resolver or SystemResolver(), allow_private=allow_private)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(backend, ssl_context or httpx.create_ssl_context()),
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
        ip = _literal_ip(host)
        if ip is not None and not address_allowed(str(ip), allow_private=self.allow_private):
            raise FetchError("blocked_address", f"{host} is not a public address")
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
            with _map_errors():
                async with self._client.stream("GET", current) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        current = self.check_url(_join(current, response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise _status_error(response)
                    return await self._save(response, dest, on_progress)
        raise FetchError("too_many_redirects", f"more than {self.max_redirects} redirects")

    async def _save(
        self,
        response: httpx.Response,
        dest: Path,
        on_progress: Callable[[], Awaitable[None]] | None,
    ) -> FetchResult:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError("too_large", f"Content-Length {declared} > {self.max_bytes}")
        digest = hashlib.sha256()
        size = reported = 0
        last_report = time.monotonic()
        kind: ImageKind | None = None
        head = b""
        buffer = bytearray()
        async with await anyio.open_file(dest, "w+b") as out:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_bytes:
                    raise FetchError("too_large", f"body exceeds {self.max_bytes} bytes")
                if kind is None:
                    head = (head + chunk)[:SNIFF_BYTES]
                    kind = _sniff_or_refuse(head, final=len(head) >= SNIFF_BYTES)
                digest.update(chunk)
                buffer += chunk
                due = (
                    size - reported >= _PROGRESS_BYTES
                    or time.monotonic() - last_report >= _PROGRESS_SECONDS
                )
                # Writing on every tick also keeps the file's mtime fresh while bytes
                # trickle in, so spool cleanup never takes it for an orphan.
                if due or len(buffer) >= _WRITE_BUFFER:
                    await out.write(bytes(buffer))
                    buffer.clear()
                if due:
                    reported, last_report = size, time.monotonic()
                    if on_progress:
                        await on_progress()
            kind = kind or _sniff_or_refuse(head, final=True)
            await out.write(bytes(buffer))
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
            await out.seek(0)
            try:  # from the open handle: whatever happens to the path meanwhile
                width, height = await anyio.to_thread.run_sync(read_dimensions, out.wrapped, kind)
            except NotAnImageError as exc:
                raise FetchError("not_an_image", str(exc)) from exc
        assert kind is not None
        return FetchResult(
            size_bytes=size,
            sha256=digest.hexdigest(),
            content_type=kind.content_type,
            extension=kind.extension,
            width=width,
            height=height,
            final_url=str(response.url),
        )


def _sniff_or_refuse(head: bytes, *, final: bool) -> ImageKind | None:
    kind = sniff(head)
    if kind is None and final:
        raise FetchError("not_an_image", "the body is not a PNG, JPEG or WEBP image")
    return kind


def _join(base: httpx.URL, location: str) -> httpx.URL:
    try:
        return base.join(location)
    except httpx.InvalidURL as exc:
        raise FetchError("bad_url", f"bad redirect location: {exc}") from exc
