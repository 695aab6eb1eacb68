"""Helpers for the simulator tests: an in-process simulator handle and a callback receiver."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.simulator import SimulatorState

KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = "http://sim"


@dataclass
class Sim:
    """A simulator app with a client that talks to it in process."""

    app: FastAPI
    state: SimulatorState
    client: httpx.AsyncClient

    async def submit(self, prompt: str = "a red fox", **fields: Any) -> dict[str, Any]:
        """Submit a valid task and return the task object."""
        body = {"model": "gpt-image-1.5", "prompt": prompt, **fields}
        response = await self.client.post("/v1/images/generations", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def query(self, task_id: str) -> dict[str, Any]:
        """The query API's answer for ``task_id``, in whatever shape the task speaks."""
        response = await self.client.get(f"/v1/tasks/{task_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def query_data(self, task_id: str) -> dict[str, Any]:
        """The ``data`` object of an enveloped query answer."""
        answer = await self.query(task_id)
        assert answer["code"] == 200, answer
        data: dict[str, Any] = answer["data"]
        return data

    async def completed(self, prompt: str = "a red fox", **fields: Any) -> dict[str, Any]:
        """Submit, wait for completion, and return the query answer."""
        task = await self.submit(prompt, **fields)
        await self.wait_status(task["id"], "completed")
        return await self.query(task["id"])

    async def wait_status(self, task_id: str, status: str, timeout: float = 5.0) -> None:
        """Wait until the task reaches ``status`` (without counting as a query)."""
        await wait_for(lambda: self.state.tasks[task_id].status == status, timeout)


SimFactory = Callable[..., Awaitable[Sim]]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


@dataclass
class Received:
    """One request seen by the receiver."""

    at: float  # monotonic
    path: str
    body: Any


@dataclass
class Receiver:
    """A raw ASGI callback receiver answering scripted statuses; served over a real socket."""

    base_url: str = ""
    requests: list[Received] = field(default_factory=list)
    statuses: deque[int] = field(default_factory=deque)
    default_status: int = 200
    delay: float = 0.0

    def reset(self) -> None:
        """Forget requests and script."""
        self.requests.clear()
        self.statuses.clear()
        self.default_status = 200
        self.delay = 0.0

    def url(self, path: str = "/hook") -> str:
        """An absolute URL on the receiver."""
        return f"{self.base_url}{path}"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Record the request, then answer the next scripted status."""
        assert scope["type"] == "http"
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.requests.append(
            Received(time.monotonic(), scope["path"], json.loads(b"".join(chunks)))
        )
        status = self.statuses.popleft() if self.statuses else self.default_status
        if self.delay:
            await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
