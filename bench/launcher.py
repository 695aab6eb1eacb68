"""Processes under test, each the real app plus benchmark-only routes.

`python -m bench.launcher service --port N` runs the service exactly as
`imagetasks serve` does (settings from the environment, the same logging and
uvicorn options, one worker) with `/_bench/noop` routes added: the baseline
goes through the same uvicorn, middleware and event loop as the webhook.

`python -m bench.launcher simulator --port N` runs the StarMagic simulator
with `POST /_bench/seed`, which registers already-completed provider tasks
so that callback confirmations query tasks the simulator knows.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from app.config import SettingsError, load_settings
from app.logging import configure_logging, uvicorn_log_config
from app.main import create_app
from app.simulator import SimulatorConfig, create_simulator_app
from app.simulator.engine import mint_link
from app.simulator.faults import Fault
from app.simulator.state import SimTask, SimulatorState
from app.simulator.validation import Submission

NOOP_PREFIX = "/_bench/noop"


def add_noop_routes(app: FastAPI) -> None:
    """Routes that do nothing: the same request shapes as the webhook and the API."""

    @app.post(NOOP_PREFIX + "/{task_id}/{token}", include_in_schema=False)
    async def noop_callback(task_id: str, token: str) -> dict[str, Any]:
        return {"received": True, "outcome": "noop"}

    @app.get(NOOP_PREFIX, include_in_schema=False)
    async def noop_get() -> dict[str, Any]:
        return {"items": [], "next_cursor": None}


def service_app() -> FastAPI:
    """The service's app from the environment, with the no-op routes."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"bench service: {exc}") from None
    configure_logging(settings)
    app = create_app(settings)
    add_noop_routes(app)
    return app


class Seed(BaseModel):
    ids: list[str]


def seed_completed(state: SimulatorState, ids: list[str]) -> dict[str, str]:
    """Completed provider tasks with a live image link, without timelines or callbacks;
    each task's link."""
    now = int(time.time())
    links: dict[str, str] = {}
    for task_id in ids:
        submission = Submission("gpt-image-1.5", "bench", "1:1", "medium", (), None)
        task = SimTask(
            id=task_id,
            submission=submission,
            faults=Fault(drop=True),
            eta=100,
            created=now - 100,
            status="completed",
            progress=100,
            completed=now,
            actual_time=100,
        )
        state.tasks[task_id] = task
        links[task_id] = mint_link(state, task).url
    return links


def simulator_app(port: int) -> FastAPI:
    """The simulator with callbacks dropped (the benchmark sends them) and a seed route."""
    config = SimulatorConfig(
        public_base_url=f"http://127.0.0.1:{port}",
        allow_http_callbacks=True,
        default_faults=Fault(drop=True),
    )
    app = create_simulator_app(config)
    state: SimulatorState = app.state.simulator

    @app.post("/_bench/seed", include_in_schema=False)
    async def seed(body: Seed) -> dict[str, Any]:
        links = seed_completed(state, body.ids)
        return {"tasks": len(state.tasks), "links": links}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.launcher")
    parser.add_argument("what", choices=["service", "simulator"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.what == "service":
        uvicorn.run(
            service_app(),
            host="127.0.0.1",
            port=args.port,
            log_config=uvicorn_log_config(),
            proxy_headers=False,
            access_log=False,  # as `imagetasks serve`: the app writes its own request line
            timeout_graceful_shutdown=30,
        )
    else:
        uvicorn.run(simulator_app(args.port), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
