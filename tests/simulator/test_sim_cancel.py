"""Cancelling with ``DELETE /v1/tasks/{id}``, and a provider that lacks the route."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.simulator import SimulatorConfig

from .helpers import AUTH, Receiver, Sim, SimFactory, wait_for


def route(task_id: str) -> str:
    """The task's query and cancel route."""
    return f"/v1/tasks/{task_id}"


def error_of(response: Any) -> dict[str, Any]:
    """The provider's error object, checking its shape."""
    error: dict[str, Any] = response.json()["error"]
    assert {"code", "message", "type", "param"} <= error.keys()
    return error


@pytest.mark.asyncio
async def test_cancel_a_pending_task(sim: Sim, receiver: Receiver) -> None:
    """A pending task is cancelled: the draft's answer, the cancelled status and its callback."""
    task = await sim.submit("[sim:eta=50000]", callback_url=receiver.url())
    response = await sim.client.delete(route(task["id"]), headers=AUTH)
    assert response.status_code == 200
    answer = response.json()
    assert answer.keys() == {"id", "object", "status", "message"}
    assert (answer["id"], answer["object"], answer["status"]) == (
        task["id"],
        "task.cancelled",
        "cancelled",
    )
    queried = await sim.query(task["id"])
    assert (queried["status"], queried["task_info"]) == ("cancelled", {"can_cancel": False})
    assert "results" not in queried
    await wait_for(lambda: len(receiver.requests) == 1)
    callback = receiver.requests[0].body
    assert (callback["id"], callback["status"]) == (task["id"], "cancelled")
    stats = (await sim.client.get("/_sim/stats")).json()
    assert (stats["cancelled"], stats["cancel_requests"], stats["completed"]) == (1, 1, 0)


@pytest.mark.asyncio
async def test_cancel_a_processing_task_stops_its_timeline(make_sim: SimFactory) -> None:
    """A processing task can be cancelled, and its timeline never completes it afterwards."""
    sim = await make_sim(time_scale=0.01)
    task = await sim.submit("[sim:eta=200]")  # processing after 0.2 s, completed after 2 s
    await sim.wait_status(task["id"], "processing")
    assert (await sim.query(task["id"]))["task_info"] == {"can_cancel": True}
    response = await sim.client.delete(route(task["id"]), headers=AUTH)
    assert response.status_code == 200
    await asyncio.sleep(2.5)
    assert sim.state.tasks[task["id"]].status == "cancelled"
    assert sim.state.tasks[task["id"]].links == []
    assert sim.state.counters["completed"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("outcome", ["completed", "failed", "cancelled"])
async def test_finished_task_cannot_be_cancelled(sim: Sim, outcome: str) -> None:
    """Once terminal, DELETE answers 400 in the provider's shape and changes nothing."""
    task = await sim.submit(f"[sim:outcome={outcome}]")
    await sim.wait_status(task["id"], outcome)
    before = await sim.query(task["id"])
    response = await sim.client.delete(route(task["id"]), headers=AUTH)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("task_not_cancellable", "task_id")
    assert await sim.query(task["id"]) == before
    assert sim.state.counters["cancel_requests"] == 0


@pytest.mark.asyncio
async def test_cancel_checks_key_and_id(sim: Sim) -> None:
    """DELETE needs the key, a well-formed id (400) and a known task (404)."""
    task = await sim.submit("[sim:eta=50000]")
    assert (await sim.client.delete(route(task["id"]))).status_code == 401
    unknown = await sim.client.delete(route("task-unified-1-zzzzzzzz"), headers=AUTH)
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "task_not_found")
    malformed = await sim.client.delete(route("abc"), headers=AUTH)
    assert (malformed.status_code, error_of(malformed)["code"]) == (400, "invalid_task_id")
    assert sim.state.tasks[task["id"]].status == "pending"


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [405, 404])
async def test_provider_without_cancel(make_sim: SimFactory, status: int) -> None:
    """With cancel_supported off, DELETE answers 405 (or 404 if configured) and changes nothing."""
    sim = await make_sim(cancel_supported=False, cancel_unsupported_status=status)
    task = await sim.submit("[sim:eta=50000]")
    response = await sim.client.delete(route(task["id"]), headers=AUTH)
    assert response.status_code == status
    if status == 405:
        assert response.headers["allow"] == "GET"
    assert sim.state.tasks[task["id"]].status == "pending"
    assert (await sim.query(task["id"]))["task_info"] == {"can_cancel": True}


@pytest.mark.parametrize(
    "settings",
    [
        {"body_shape": "xml"},
        {"cancel_unsupported_status": 500},
        {"image_size": (0, 10)},
        {"image_size": (10, 5000)},
        {"image_size": (10,)},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    """A shape, unsupported-cancel status or pinned size out of range fails at construction."""
    with pytest.raises(ValueError, match=next(iter(settings))):
        SimulatorConfig(**settings)


def test_defaults_speak_the_published_api() -> None:
    """By default: the published shape, cancelling on, images at the size each request implies."""
    config = SimulatorConfig()
    assert (config.body_shape, config.cancel_supported, config.image_size) == (
        "published",
        True,
        None,
    )
