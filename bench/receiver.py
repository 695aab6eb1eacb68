"""A webhook receiver that only counts: `python -m bench.receiver --port N`.

Every POST is answered 204 and counted with its arrival time; `GET /_count`
gives the count and the first and last arrival, `POST /_reset` starts again.
Bare ASGI, so the receiver is never what limits a fan-out measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import uvicorn

Scope = dict[str, Any]


class Counter:
    """The ASGI app: counts POSTs."""

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # read the whole body before answering, as a real receiver would
            message = await receive()
            more = message.get("more_body", False)
        status, body = 204, b""
        if scope["method"] == "POST" and scope["path"] == "/_reset":
            self.count, self.first, self.last = 0, None, None
        elif scope["method"] == "POST":
            now = time.time()
            self.count += 1
            self.first = self.first or now
            self.last = now
        else:
            status = 200
            body = json.dumps(
                {"count": self.count, "first": self.first, "last": self.last}
            ).encode()
        headers = [(b"content-type", b"application/json")] if body else []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(Counter(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
