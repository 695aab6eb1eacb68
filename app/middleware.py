"""ASGI middleware: a hard cap on request bodies, a request id for the logs, a path
prefix, and the host and port a trusted proxy says the caller used."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import secrets
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_access_log = structlog.get_logger("imagetasks.access")
BODY_TIMEOUT_SECONDS = 30.0
# Where a route leaves its own fields for the request's one log line (scope["state"]).
_LOG_FIELDS = "log_fields"


def log_on_request_line(scope: Scope, event: str, **fields: object) -> None:
    """Name the request's access line `event` and add `fields` to it: one line per request.

    Routes on hot paths (the webhook) say what they did here instead of writing a
    line of their own.
    """
    scope.setdefault("state", {})[_LOG_FIELDS] = {"event": event, **fields}


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Read at most `max_bytes` of a request body before the app sees any of it.

    An honest Content-Length over the cap is refused without reading; a chunked
    or lying body is cut off as soon as it passes the cap. A client that
    trickles its body only ties up its own connection, and not for long.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_SECONDS
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _refuse(send, 413, "payload_too_large", too_large)
                return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await _refuse(send, 413, "payload_too_large", too_large)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _refuse(send, 408, "request_timeout", "request body took too long to arrive")
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestContextMiddleware:
    """Give every request an id (the caller's X-Request-ID if sane) for the logs.

    The id is bound to the log context for the whole request and echoed back,
    and the access log line is written here (not by uvicorn) so that it carries
    the id too; the redactor hides callback tokens in its path.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
        request_id = request_id or secrets.token_hex(8)

        status = 500
        started = time.perf_counter()
        # Shared with the route (request.state): it may add to this request's line.
        state = scope.setdefault("state", {})

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                client = scope.get("client")
                fields = dict(state.pop(_LOG_FIELDS, None) or {"event": "request"})
                _access_log.info(
                    fields.pop("event"),
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    client=client[0] if client else None,
                    **fields,
                )


class RootPathMiddleware:
    """Serve under a path prefix (ROOT_PATH), as `uvicorn --root-path` would.

    Generated URLs carry the prefix; requests work with or without it, so the
    proxy may strip it or pass it through.
    """

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.root_path:
            scope = {**scope, "root_path": scope.get("root_path", "") + self.root_path}
            path = scope["path"]
            if not path.startswith(scope["root_path"]):
                scope["path"] = scope["root_path"] + path
        await self.app(scope, receive, send)


# A host name or bracketed IPv6 literal, with an optional port (checked for range below).
_FORWARDED_HOST = re.compile(
    r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_FORWARDED_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_proxy_log = structlog.get_logger("imagetasks.proxy")


class TrustedPeers:
    """The peers named in TRUSTED_PROXIES, read as uvicorn reads them: "*" for
    anyone, IP addresses, CIDR networks, or literal names (e.g. a unix socket)."""

    def __init__(self, entries: list[str] | str) -> None:
        items = [e.strip() for e in entries.split(",")] if isinstance(entries, str) else entries
        self.anyone = "*" in items
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.literals: set[str] = set()
        for item in filter(None, items):
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.literals.add(item)

    def __contains__(self, peer: str) -> bool:
        if self.anyone or peer in self.literals:
            return True
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def _last_value(raw: bytes) -> str:
    # Each proxy appends; the last value is the one our own (trusted) proxy wrote.
    return raw.decode("latin-1").split(",")[-1].strip()


class ForwardedHostMiddleware:
    """Believe X-Forwarded-Host and X-Forwarded-Port from trusted proxies only.

    Generated URLs (`Location`, image URLs) are built from the Host header. A
    proxy that rewrites Host (nginx's `$host` drops a non-default port) tells
    the caller's host and port with these headers; they replace Host for the
    request. From any other peer they are ignored. A trusted proxy sending a
    malformed value is misconfigured: the request is refused with a 400 that
    names the header, rather than answered with wrong URLs.

    It must run before uvicorn's ProxyHeadersMiddleware replaces the peer
    address with the X-Forwarded-For client.
    """

    def __init__(self, app: ASGIApp, trusted_hosts: list[str] | str) -> None:
        self.app = app
        self.trusted = TrustedPeers(trusted_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or client is None or client[0] not in self.trusted:
            await self.app(scope, receive, send)
            return
        forwarded: dict[bytes, str] = {}
        host_header = ""
        for name, value in scope["headers"]:
            if name in (b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-proto"):
                forwarded[name] = _last_value(value)
            elif name == b"host":
                host_header = value.decode("latin-1")
        host, port = forwarded.get(b"x-forwarded-host"), forwarded.get(b"x-forwarded-port")
        if host is None and port is None:
            await self.app(scope, receive, send)
            return
        match = _FORWARDED_HOST.fullmatch(host if host is not None else host_header)
        if match is None or (match["port"] is not None and not 0 < int(match["port"]) < 65536):
            header = "X-Forwarded-Host" if host is not None else "Host"
            await self._refuse(send, client[0], header, f"{header} is not a host[:port]")
            return
        authority = match[0]
        if port is not None:
            if not _FORWARDED_PORT.fullmatch(port) or not 0 < int(port) < 65536:
                message = "X-Forwarded-Port is not a port number (1-65535)"
                await self._refuse(send, client[0], "X-Forwarded-Port", message)
                return
            scheme: str = forwarded.get(b"x-forwarded-proto") or scope["scheme"]
            default = _DEFAULT_PORTS.get(scheme)
            authority = match["name"] if int(port) == default else f"{match['name']}:{int(port)}"
        headers = [(n, v) for n, v in scope["headers"] if n != b"host"]
        headers.append((b"host", authority.encode("latin-1")))
        await self.app({**scope, "headers": headers}, receive, send)

    @staticmethod
    async def _refuse(send: Send, proxy: str, header: str, message: str) -> None:
        # Outside the request-context middleware: say here which proxy is misconfigured.
        _proxy_log.warning("bad_forwarded_header", proxy=proxy, header=header)
        await _refuse(send, 400, "bad_forwarded_header", message)
