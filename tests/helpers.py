"""Plain helpers for tests: upstream doubles and snapshot bodies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from app.simulator import SimulatorConfig, create_simulator_app
from app.simulator.faults import Fault


def simulator_transport(**config: Any) -> tuple[httpx.ASGITransport, Any]:
    """The real simulator app as an in-process upstream (callbacks dropped)."""
    options: dict[str, Any] = {
        "api_key": "sim-key",
        "public_base_url": "http://starmagic.test",
        "time_scale": 0.01,
        "default_faults": Fault(drop=True),
    }
    options.update(config)
    app = create_simulator_app(SimulatorConfig(**options))
    return httpx.ASGITransport(app=app), app


def scripted_transport(
    handler: Callable[[httpx.Request], httpx.Response],
) -> httpx.MockTransport:
    """An upstream double for the narrow retry-rule tests."""
    return httpx.MockTransport(handler)


def task_body(
    status: str,
    *,
    upstream_id: str = "task-unified-1757156493-imcg5zqt",
    progress: int | None = None,
    url: str | list[str] | None = "https://cdn.example.com/out.png",
    envelope: bool = True,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A provider task snapshot, in either of its shapes."""
    data: dict[str, Any] = {"id": upstream_id, "status": status, "created": 1757156493}
    if progress is not None:
        data["progress"] = progress
    if status == "completed":
        data["progress"] = 100
        data["result"] = {"images": [{"url": url, "expires_at": 4102444800}]}
        data["completed"] = 1757156593
    if error is not None:
        data["error"] = error
    return {"code": 200, "data": data} if envelope else data


def dumps(body: Any) -> bytes:
    """JSON bytes for a raw request body."""
    return json.dumps(body).encode()
