"""The demo's webhook receiver: a loopback HTTP server that keeps what it is sent."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from app.webhooks import signing

MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Received:
    """One POST as the receiver saw it."""

    headers: dict[str, str]
    body: bytes

    def verified(self, secret: str, tolerance: float = 300) -> bool:
        """The Standard Webhooks check: a fresh timestamp and a signature of this secret."""
        try:
            stamp = int(self.headers.get("webhook-timestamp", ""))
        except ValueError:
            return False
        if abs(time.time() - stamp) > tolerance:
            return False
        return signing.verify(
            secret,
            self.headers.get("webhook-id", ""),
            stamp,
            self.body,
            self.headers.get("webhook-signature", ""),
        )


class DemoReceiver:
    """Serves POST on 127.0.0.1 in a thread; answers 204 and remembers each request."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("content-length") or 0), MAX_BODY)
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                self.send_response(204)
                self.end_headers()
                with receiver._arrived:
                    receiver.received.append(Received(headers, body))
                    receiver._arrived.notify_all()

            def log_message(self, format: str, *args: object) -> None:
                pass  # the demo prints what matters itself

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where to send webhooks."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def start(self) -> DemoReceiver:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def wait(self, event_type: str, timeout: float) -> Received | None:
        """The first request whose body names `event_type`, waiting up to `timeout` s."""
        needle = f'"type":"{event_type}"'.encode()
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for request in self.received:
                    if needle in request.body:
                        return request
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)
