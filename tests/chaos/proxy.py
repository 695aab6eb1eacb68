"""A round-robin HTTP forwarder in front of the service replicas, in its own thread.

The simulator delivers every callback to one URL (``PUBLIC_BASE_URL``). This
forwarder listens there and hands each request to the next replica in turn,
so duplicates and retries of one callback land on different replicas. Like
nginx (``proxy_next_upstream error``), a refused connection is tried on the
next replica, since nothing was sent; a replica that dies while it holds a
request gets the caller a 502, and the provider's retry goes to the next one.
It runs on its own event loop so that a test blocking its own loop (waiting
for a process to exit, say) never stalls the traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from app.logging import redact_text

# Hop-by-hop headers and the ones httpx and uvicorn compute again.
_SKIP_REQUEST = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}
_SKIP_RESPONSE = {"content-length", "connection", "transfer-encoding", "keep-alive"}


@dataclass(frozen=True)
class Forwarded:
    """One request through the forwarder and what came of it."""

    replica: int
    method: str
    path: str  # callback tokens redacted
    status: int
    from_replica: bool  # False when the forwarder itself answered (replica unreachable)
    degraded: bool  # a replica was marked down when the request started or ended
    started: float
    ended: float
    error: str = ""  # why the forwarder answered itself: the exchange's exception
    request_id: str = ""  # the X-Request-ID the replica was sent (and logs the request under)


def _chain(exc: BaseException) -> str:
    """The exception and what caused it, down to the socket's own error."""
    links = []
    seen: BaseException | None = exc
    while seen is not None and len(links) < 6:
        links.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(links)


class RoundRobinProxy:
    """Alternates requests between ``targets``; records every exchange."""

    def __init__(self, port: int, targets: list[str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.targets = targets
        self.records: list[Forwarded] = []
        self.down: set[int] = set()
        self.inflight_callbacks = [0] * len(targets)  # per replica, right now
        self.failovers = 0  # requests a refused connection sent on to the next replica
        self._turn = itertools.count()
        self._request_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None

    # -- control, from the test's thread --------------------------------------------

    def start(self) -> None:
        """Serve in a daemon thread; return once the socket listens."""
        config = uvicorn.Config(
            self._app,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            access_log=False,
            log_level="warning",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the forwarder did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down and join its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def mark_down(self, replica: int) -> None:
        """Note that a replica is about to go away (before the kill)."""
        with self._lock:
            self.down.add(replica)

    def mark_up(self, replica: int) -> None:
        """Note that a replica is back (after it answered /readyz)."""
        with self._lock:
            self.down.discard(replica)

    @property
    def degraded(self) -> bool:
        """True while any replica is marked down."""
        with self._lock:
            return bool(self.down)

    def webhook_records(self) -> list[Forwarded]:
        """The callback deliveries that went through."""
        return [r for r in list(self.records) if r.path.startswith("/webhooks/")]

    # -- the server, in its own thread ----------------------------------------------

    def _run(self) -> None:
        assert self._server is not None
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        assert self._server is not None
        # A fresh connection for each request, as nginx makes by default (no upstream
        # keepalive). A pooled one was twice the cause of a 502 with both replicas up:
        # when this thread stalls (the test process holds the GIL for seconds now and
        # then), httpcore's pool sees an idle connection's keep-alive run out, though it
        # has just handed it to a request, and closes it under that request after the
        # replica got it: the replica answered 200, the caller got a 502.
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, trust_env=False, limits=limits) as client:
            self._client = client
            await self._server.serve()

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        first = next(self._turn) % len(self.targets)
        degraded_at_start = self.degraded
        started = time.monotonic()
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _SKIP_REQUEST]
        # Each exchange named, so that a replica's log line can be matched to its record.
        request_id = f"fwd-{next(self._request_ids)}"
        headers = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
        headers.append((b"x-request-id", request_id.encode()))
        callback = path.startswith("/webhooks/")
        status, from_replica, replica = 502, False, first
        failure = "no replica accepted the connection"
        error = {"error": {"code": "bad_gateway", "message": "no replica answered"}}
        body = json.dumps(error).encode()
        out_headers = [(b"content-type", b"application/json")]
        assert self._client is not None
        # Like nginx's proxy_next_upstream error: a refused connection (nothing was sent)
        # goes to the next replica; a replica dying mid-request gets the caller a 502.
        for offset in range(len(self.targets)):
            replica = (first + offset) % len(self.targets)
            url = self.targets[replica] + path + (f"?{query}" if query else "")
            if callback:
                self.inflight_callbacks[replica] += 1
            try:
                response = await self._client.request(
                    scope["method"], url, content=b"".join(chunks), headers=headers
                )
            except httpx.ConnectError:
                self.failovers += 1
                continue
            except httpx.HTTPError as exc:
                failure = _chain(exc)
                error = {"error": {"code": "bad_gateway", "message": type(exc).__name__}}
                body = json.dumps(error).encode()
                break
            finally:
                if callback:
                    self.inflight_callbacks[replica] -= 1
            status, body, from_replica = response.status_code, response.content, True
            failure = ""
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.items()
                if k.lower() not in _SKIP_RESPONSE
            ]
            break
        self.records.append(
            Forwarded(
                replica=replica,
                method=scope["method"],
                path=redact_text(path),
                status=status,
                from_replica=from_replica,
                degraded=degraded_at_start or self.degraded,
                started=started,
                ended=time.monotonic(),
                error=failure,
                request_id=request_id,
            )
        )
        out_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": body})
