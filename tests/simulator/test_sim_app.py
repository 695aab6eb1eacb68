"""The app as a whole: control routes, mounting under a prefix, and serving over real sockets."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.simulator import SimulatorConfig, SimulatorState, create_simulator_app

from .helpers import AUTH, Receiver, Sim, wait_for


def free_socket() -> socket.socket:
    """A bound loopback socket on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def served(make_app: Callable[[str], FastAPI]) -> AsyncIterator[tuple[str, FastAPI]]:
    """Serve ``make_app(base_url)`` with uvicorn (lifespan on) on a free port in this loop."""
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = make_app(base)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started)
    try:
        yield base, app
    finally:
        server.should_exit = True
        await task


def sim_config(base: str, **overrides: Any) -> SimulatorConfig:
    """Fast settings for a simulator reachable at ``base``."""
    settings: dict[str, Any] = {
        "public_base_url": base,
        "time_scale": 0.001,
        "retry_delays": (0.05, 0.05, 0.05),
        "allow_http_callbacks": True,
    }
    return SimulatorConfig(**(settings | overrides))


@pytest.mark.asyncio
async def test_control_routes(sim: Sim) -> None:
    """Tasks can be listed, inspected, forced to an outcome, and everything reset."""
    task = await sim.submit(prompt="[sim:eta=50000]")
    view = (await sim.client.get(f"/_sim/tasks/{task['id']}")).json()
    assert view["status"] == "pending"
    assert view["faults"]["eta"] == 50000
    assert view["request"]["prompt"] == "[sim:eta=50000]"
    route = f"/_sim/tasks/{task['id']}/complete"
    forced = await sim.client.post(route, json={"outcome": "failed"})
    assert forced.status_code == 200
    assert (await sim.query(task["id"]))["status"] == "failed"
    assert (await sim.client.post(route)).status_code == 409
    assert (await sim.client.post("/_sim/tasks/nope/complete")).status_code == 404
    listed = (await sim.client.get("/_sim/tasks")).json()
    assert [item["id"] for item in listed] == [task["id"]]
    stats = (await sim.client.get("/_sim/stats")).json()
    assert stats["submits"] == 1
    assert stats["queries_per_task"] == {task["id"]: 1}
    assert stats["failed"] == 1
    await sim.client.post("/_sim/faults", json={"drop": True})
    reset = (await sim.client.post("/_sim/reset")).json()
    assert reset["tasks"] == 0
    assert reset["submits"] == 0
    assert (await sim.client.get("/_sim/faults")).json()["drop"] is False
    response = await sim.client.get(f"/v1/tasks/{task['id']}", headers=AUTH)
    assert response.status_code == 404


@pytest.mark.asyncio
async def test_forced_completion_cancels_the_timeline(sim: Sim) -> None:
    """A forced outcome is final: the timer never moves the task again."""
    task = await sim.submit(prompt="[sim:eta=1]")
    await sim.client.post(f"/_sim/tasks/{task['id']}/complete", json={"outcome": "cancelled"})
    await asyncio.sleep(0.05)
    assert sim.state.tasks[task["id"]].status == "cancelled"
    assert sim.state.counters["completed"] == 0


@pytest.mark.asyncio
async def test_mounted_under_a_prefix(receiver: Receiver) -> None:
    """Mounted in a parent app, routes and links live under the prefix; the parent closes it."""
    base = "http://parent/_sandbox/starmagic"
    simulator = create_simulator_app(sim_config(base))
    state: SimulatorState = simulator.state.simulator

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.aclose()

    parent = FastAPI(lifespan=lifespan)
    parent.mount("/_sandbox/starmagic", simulator)
    transport = httpx.ASGITransport(app=parent)
    async with httpx.AsyncClient(transport=transport, base_url=base + "/") as client:
        body = {"model": "gpt-image-1.5", "prompt": "x", "callback_url": receiver.url()}
        submitted = await client.post("v1/images/generations", json=body, headers=AUTH)
        assert submitted.status_code == 200
        task_id = submitted.json()["id"]
        await wait_for(lambda: len(receiver.requests) == 1)
        (url,) = (await client.get(f"v1/tasks/{task_id}", headers=AUTH)).json()["results"]
        assert url.startswith(base + "/files/")
        assert (await client.get(url)).content.startswith(b"\x89PNG")
        assert (await client.get("_sim/stats")).json()["submits"] == 1
    async with parent.router.lifespan_context(parent):
        pass
    assert state.idle  # closed by the parent's lifespan


@pytest.mark.asyncio
async def test_served_over_real_sockets(receiver: Receiver) -> None:
    """Under uvicorn: submit, callback, download; a lying Content-Length breaks the body."""
    async with (
        served(lambda base: create_simulator_app(sim_config(base))) as (base, app),
        httpx.AsyncClient(base_url=base, headers=AUTH) as client,
    ):
        body = {"model": "gpt-image-1.5", "prompt": "x", "callback_url": receiver.url()}
        task = (await client.post("/v1/images/generations", json=body)).json()
        await wait_for(lambda: len(receiver.requests) == 1)
        (url,) = receiver.requests[0].body["results"]
        assert url.startswith(base + "/files/")
        assert (await client.get(url)).content.startswith(b"\x89PNG")
        body["prompt"] = "x [sim:oversize=header]"
        liar = (await client.post("/v1/images/generations", json=body)).json()
        await wait_for(lambda: len(receiver.requests) == 2)
        (url,) = (await client.get(f"/v1/tasks/{liar['id']}")).json()["results"]
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
        assert task["id"] in app.state.simulator.tasks
    assert app.state.simulator.idle  # the lifespan closed it


@pytest.mark.asyncio
async def test_slow_image_sends_headers_first() -> None:
    """With ``image_slow`` the headers come at once and the body trickles over the socket."""
    async with (
        served(lambda base: create_simulator_app(sim_config(base))) as (base, _),
        httpx.AsyncClient(base_url=base, headers=AUTH) as client,
    ):
        body = {"model": "gpt-image-1.5", "prompt": "x [sim:image_slow=0.5]"}
        task = (await client.post("/v1/images/generations", json=body)).json()
        await asyncio.sleep(0.2)
        (url,) = (await client.get(f"/v1/tasks/{task['id']}")).json()["results"]
        async with client.stream("GET", url) as response:
            # The status and length are here while the body is still on its way.
            assert response.status_code == 200
            declared = int(response.headers["content-length"])
            parts = [part async for part in response.aiter_raw()]
        assert len(parts) > 5
        assert len(parts[0]) < declared
        assert len(b"".join(parts)) == declared


def test_run_simulator_serves_until_terminated() -> None:
    """``run_simulator`` serves in its own process and stops cleanly on SIGTERM."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    code = (
        "from app.simulator import SimulatorConfig, run_simulator; "
        f"run_simulator('127.0.0.1', {port}, SimulatorConfig(time_scale=0.01))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/_sim/stats", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
        assert response.json()["tasks"] == 0
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why.
    assert process.returncode in (0, -signal.SIGTERM)
    assert b"Application shutdown complete" in stderr
