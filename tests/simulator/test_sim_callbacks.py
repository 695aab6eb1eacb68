"""Callbacks over real loopback sockets: the retry policy, payload shapes and delivery faults."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from app.simulator import SimulatorConfig

from .helpers import Receiver, Sim, SimFactory, wait_for


def gaps(receiver: Receiver) -> list[float]:
    """Seconds between consecutive requests the receiver saw."""
    times = [request.at for request in receiver.requests]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def attempts(sim: Sim, task_id: str) -> list[Any]:
    """The simulator's record of a task's callback attempts."""
    return sim.state.tasks[task_id].attempts


@pytest.mark.asyncio
async def test_default_policy_retries_one_then_two_seconds_after_failures(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    """With the real retry_delays, a receiver failing twice sees attempts ~1 s then ~2 s apart."""
    sim = await make_sim(retry_delays=(1.0, 2.0, 4.0))
    receiver.statuses.extend([500, 503])
    task = await sim.submit(callback_url=receiver.url())
    await wait_for(lambda: len(attempts(sim, task["id"])) == 3, timeout=6)
    first, second = gaps(receiver)
    assert 0.95 <= first <= 1.4
    assert 1.95 <= second <= 2.4
    recorded = attempts(sim, task["id"])
    assert [a.attempt for a in recorded] == [1, 2, 3]
    assert [a.status_code for a in recorded] == [500, 503, 200]
    assert all(a.delivery == 1 and a.kind == "terminal" for a in recorded)
    assert all(a.latency_ms >= 0 and a.started_at > 0 for a in recorded)


@pytest.mark.asyncio
async def test_default_policy_gives_up_after_three_retries(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    """A receiver that always fails sees exactly 4 attempts (1, 2, 4 s apart) and nothing after."""
    sim = await make_sim(retry_delays=(1.0, 2.0, 4.0))
    receiver.default_status = 500
    task = await sim.submit(callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 4, timeout=10)
    assert [round(gap) for gap in gaps(receiver)] == [1, 2, 4]
    await asyncio.sleep(1.5)
    assert len(receiver.requests) == 4
    assert [a.status_code for a in attempts(sim, task["id"])] == [500] * 4


def test_default_config_uses_the_providers_policy() -> None:
    """SimulatorConfig defaults to the documented 10 s timeout and 1/2/4 s retries, https only."""
    config = SimulatorConfig()
    assert config.retry_delays == (1.0, 2.0, 4.0)
    assert config.callback_timeout == 10.0
    assert config.allow_http_callbacks is False


@pytest.mark.asyncio
async def test_timeouts_and_connection_errors_are_retried(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    """A slow receiver times out, a closed port refuses; both are recorded by error name."""
    sim = await make_sim(callback_timeout=0.2)
    receiver.delay = 0.5
    slow = await sim.submit(callback_url=receiver.url())
    dead = await sim.submit(callback_url="http://127.0.0.1:9/nothing")
    await wait_for(lambda: len(attempts(sim, slow["id"])) == 4, timeout=5)
    await wait_for(lambda: len(attempts(sim, dead["id"])) == 4, timeout=5)
    assert {a.error for a in attempts(sim, slow["id"])} == {"TimeoutError"}
    assert all(150 <= a.latency_ms < 450 for a in attempts(sim, slow["id"]))
    assert all(a.error == "ConnectError" for a in attempts(sim, dead["id"]))
    assert all(a.status_code is None for a in attempts(sim, dead["id"]))


@pytest.mark.asyncio
async def test_published_body_matches_the_query(sim: Sim, receiver: Receiver) -> None:
    """By default the callback body is the published task object, the same as the query's."""
    task = await sim.submit(callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 1)
    body = receiver.requests[0].body
    assert body == await sim.query(task["id"])
    assert body["object"] == "image.generation.task"
    assert body["status"] == "completed"
    assert [type(url) for url in body["results"]] == [str]
    assert "code" not in body
    assert "data" not in body


@pytest.mark.asyncio
async def test_envelope_body_matches_the_query(sim: Sim, receiver: Receiver) -> None:
    """``body=envelope`` posts the query API's {"code", "data"} envelope, as the query answers."""
    task = await sim.submit(prompt="[sim:body=envelope]", callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 1)
    body = receiver.requests[0].body
    assert body["code"] == 200
    assert body["data"] == (await sim.query_data(task["id"]))
    assert body["data"]["status"] == "completed"
    assert isinstance(body["data"]["result"]["images"][0]["url"], str)


@pytest.mark.asyncio
async def test_configured_shape_applies_to_callbacks_and_queries(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    """``body_shape="envelope"`` makes the envelope the default; ``body=published`` overrides it."""
    sim = await make_sim(body_shape="envelope")
    enveloped = await sim.submit(callback_url=receiver.url("/e"))
    published = await sim.submit(prompt="[sim:body=published]", callback_url=receiver.url("/p"))
    await wait_for(lambda: len(receiver.requests) == 2)
    bodies = {request.path: request.body for request in receiver.requests}
    assert bodies["/e"]["data"]["id"] == enveloped["id"]
    assert bodies["/p"]["id"] == published["id"]
    assert "results" in bodies["/p"]
    assert (await sim.query(enveloped["id"]))["code"] == 200
    assert (await sim.query(published["id"]))["object"] == "image.generation.task"


@pytest.mark.asyncio
async def test_bare_body_and_url_list(sim: Sim, receiver: Receiver) -> None:
    """``body=bare`` posts the data object alone; ``url=list`` shows in callbacks too."""
    task = await sim.submit(prompt="[sim:body=bare,url=list]", callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 1)
    body = receiver.requests[0].body
    assert "code" not in body
    assert body["id"] == task["id"]
    assert body["status"] == "completed"
    assert isinstance(body["result"]["images"][0]["url"], list)


@pytest.mark.asyncio
@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
async def test_terminal_failures_are_called_back(
    sim: Sim, receiver: Receiver, outcome: str
) -> None:
    """Failed and cancelled tasks are called back too."""
    await sim.submit(prompt=f"[sim:outcome={outcome}]", callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 1)
    body = receiver.requests[0].body
    assert body["status"] == outcome
    assert "results" not in body
    assert ("error" in body) is (outcome == "failed")


@pytest.mark.asyncio
async def test_dup_sends_sequential_duplicates(sim: Sim, receiver: Receiver) -> None:
    """``dup=3`` delivers the same terminal body three times, one after another."""
    task = await sim.submit(prompt="[sim:dup=3]", callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 3)
    await asyncio.sleep(0.1)
    assert len(receiver.requests) == 3
    assert len({str(request.body) for request in receiver.requests}) == 1
    assert [a.delivery for a in attempts(sim, task["id"])] == [1, 2, 3]


@pytest.mark.asyncio
async def test_concurrent_dup_overlaps(sim: Sim, receiver: Receiver) -> None:
    """``concurrent_dup=3`` has three deliveries in flight at once."""
    receiver.delay = 0.5  # each answer is held, so sequential deliveries could not overlap
    task = await sim.submit(prompt="[sim:concurrent_dup=3]", callback_url=receiver.url())
    await wait_for(lambda: len(attempts(sim, task["id"])) == 3, timeout=30)
    tried = attempts(sim, task["id"])
    # In flight at once: every delivery started before the first one was answered.
    assert max(a.started_at for a in tried) < min(a.started_at + a.latency_ms / 1000 for a in tried)


@pytest.mark.asyncio
async def test_late_processing_follows_the_terminal_callback(sim: Sim, receiver: Receiver) -> None:
    """``late_processing`` sends a stale processing snapshot after the completed one."""
    task = await sim.submit(prompt="[sim:late_processing]", callback_url=receiver.url())
    await wait_for(lambda: len(attempts(sim, task["id"])) == 2)
    statuses = [request.body["status"] for request in receiver.requests]
    assert statuses == ["completed", "processing"]
    assert receiver.requests[1].body["progress"] < 100
    assert receiver.requests[1].body["task_info"] == {"can_cancel": True}
    assert "results" not in receiver.requests[1].body
    assert [a.kind for a in attempts(sim, task["id"])] == ["terminal", "late_processing"]


@pytest.mark.asyncio
async def test_drop_sends_nothing(sim: Sim, receiver: Receiver) -> None:
    """``drop`` completes the task without any callback."""
    task = await sim.submit(prompt="[sim:drop]", callback_url=receiver.url())
    await sim.wait_status(task["id"], "completed")
    await asyncio.sleep(0.2)
    assert receiver.requests == []
    assert attempts(sim, task["id"]) == []


@pytest.mark.asyncio
async def test_global_faults_apply_and_prompts_override(sim: Sim, receiver: Receiver) -> None:
    """Faults set by the control route apply to new tasks; a prompt directive overrides them."""
    response = await sim.client.post("/_sim/faults", json={"dup": 2, "body": "bare"})
    assert response.status_code == 200
    assert response.json()["dup"] == 2
    await sim.submit(callback_url=receiver.url("/a"))
    await sim.submit(prompt="[sim:dup=1]", callback_url=receiver.url("/b"))
    await wait_for(lambda: len(receiver.requests) == 3)
    await asyncio.sleep(0.1)
    paths = sorted(request.path for request in receiver.requests)
    assert paths == ["/a", "/a", "/b"]
    # The bare data object: neither the envelope nor the published task object.
    assert all("code" not in request.body for request in receiver.requests)
    assert all("result" in request.body for request in receiver.requests)
    assert all("object" not in request.body for request in receiver.requests)
    bad = await sim.client.post("/_sim/faults", json={"dupe": 2})
    assert bad.status_code == 400


@pytest.mark.asyncio
async def test_manual_callback_sends_a_chosen_snapshot(sim: Sim, receiver: Receiver) -> None:
    """``POST /_sim/tasks/{id}/callback`` delivers a stale or forged body on demand."""
    task = await sim.submit(prompt="[sim:drop]", callback_url=receiver.url())
    await sim.wait_status(task["id"], "completed")
    route = f"/_sim/tasks/{task['id']}/callback"
    response = await sim.client.post(route, json={"status": "pending", "body": "bare"})
    assert response.status_code == 200
    assert response.json()["attempts"][0]["status_code"] == 200
    assert receiver.requests[-1].body["status"] == "pending"
    forged = {"code": 200, "data": {"id": task["id"], "status": "failed"}}
    receiver.statuses.append(500)
    response = await sim.client.post(route, json={"payload": forged, "retry": True})
    assert [a["status_code"] for a in response.json()["attempts"]] == [500, 200]
    assert receiver.requests[-1].body == forged
    kinds = {a.kind for a in attempts(sim, task["id"])}
    assert kinds == {"manual"}


@pytest.mark.asyncio
async def test_manual_callback_needs_a_url(sim: Sim) -> None:
    """A task without callback_url needs one in the request; unknown tasks are 404."""
    task = await sim.submit()
    route = f"/_sim/tasks/{task['id']}/callback"
    assert (await sim.client.post(route, json={})).status_code == 409
    assert (await sim.client.post("/_sim/tasks/nope/callback", json={})).status_code == 404


@pytest.mark.asyncio
async def test_stats_count_a_task_until_its_last_callback_is_sent(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    """``callbacks_pending`` counts a task from its outcome until its last retry and
    duplicate are sent, so a test counting deliveries knows when none can come."""
    sim = await make_sim(retry_delays=(0.5,))
    receiver.statuses.append(500)
    task = await sim.submit(prompt="[sim:dup=2]", callback_url=receiver.url())
    await wait_for(lambda: len(receiver.requests) == 1)
    stats = (await sim.client.get("/_sim/stats")).json()
    assert stats["callbacks_pending"] == 1  # the retry, then the duplicate, are to come
    await wait_for(lambda: sim.state.stats()["callbacks_pending"] == 0)
    assert [a.status_code for a in attempts(sim, task["id"])] == [500, 200, 200]
    assert len(receiver.requests) == 3
