"""A webhook receiver for tests: records every request and answers from a script.

Runs in-process (`create_receiver()` under uvicorn) or as its own process
(`python -m tests.webhooks.receiver --port N`). `POST /_script` sets the answers
a path gives, one per request, then 200s; `GET /_received` lists what came.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response


def create_receiver(record: Path | None = None) -> FastAPI:
    """The receiver app; its state lives on `app.state`, and with `record` every request
    is also appended to that file as a JSON line (it outlives a restart)."""
    app = FastAPI()
    app.state.received = []
    app.state.scripts = {}

    @app.post("/_script")
    async def script(body: dict[str, Any]) -> dict[str, bool]:
        app.state.scripts[body["path"]] = list(body["answers"])
        return {"ok": True}

    @app.get("/_received")
    async def received() -> list[dict[str, Any]]:
        return list(app.state.received)

    @app.post("/_reset")
    async def reset() -> dict[str, bool]:
        app.state.received.clear()
        app.state.scripts.clear()
        return {"ok": True}

    @app.post("/{path:path}")
    async def hook(path: str, request: Request) -> Response:
        body = await request.body()
        answers = app.state.scripts.get("/" + path) or []
        answer: dict[str, Any] = answers.pop(0) if answers else {"status": 200}
        seen = {
            "path": "/" + path,
            "at": time.time(),
            "headers": dict(request.headers),
            "body": body.decode(),
            "answer": int(answer["status"]),
        }
        app.state.received.append(seen)
        if answer.get("sleep"):
            await asyncio.sleep(float(answer["sleep"]))
        if record is not None:
            with record.open("a") as file:
                file.write(json.dumps(seen) + "\n")
        return Response(status_code=int(answer["status"]), headers=answer.get("headers") or {})

    return app


def main() -> None:
    """Serve the receiver on 127.0.0.1 (for end-to-end tests)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    app = create_receiver(args.record)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
