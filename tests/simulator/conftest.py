"""Fixtures for the simulator tests: in-process simulators and a real callback receiver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn

from app.simulator import SimulatorConfig, create_simulator_app

from .helpers import BASE, Receiver, Sim, SimFactory, wait_for


@pytest_asyncio.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Build simulators with fast timelines and fast retries unless told otherwise."""
    sims: list[Sim] = []

    async def factory(**overrides: Any) -> Sim:
        settings: dict[str, Any] = {
            "public_base_url": BASE,
            "time_scale": 0.001,
            "retry_delays": (0.05, 0.05, 0.05),
            "callback_timeout": 1.0,
            "allow_http_callbacks": True,
        }
        settings.update(overrides)
        app = create_simulator_app(SimulatorConfig(**settings))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
        sim = Sim(app=app, state=app.state.simulator, client=client)
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        await sim.client.aclose()
        await sim.state.aclose()


@pytest_asyncio.fixture
async def sim(make_sim: SimFactory) -> Sim:
    """A simulator with the test defaults."""
    return await make_sim()


@pytest_asyncio.fixture(scope="session")
async def receiver_server() -> AsyncIterator[Receiver]:
    """One receiver for the session, on a free loopback port."""
    receiver = Receiver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    receiver.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(receiver, lifespan="off", log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started)
    yield receiver
    server.should_exit = True
    await task


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    """The session receiver, reset for this test."""
    receiver_server.reset()
    return receiver_server
