"""The three snapshot shapes field by field, failure codes, and the control routes' shape names."""

from __future__ import annotations

import pytest

from .helpers import AUTH, Receiver, Sim, SimFactory, wait_for

PUBLISHED_KEYS = {"id", "object", "type", "model", "status", "progress", "created", "task_info"}


@pytest.mark.asyncio
async def test_published_shape_field_by_field(sim: Sim) -> None:
    """Pending and completed published objects carry exactly the documented fields."""
    task = await sim.submit("[sim:eta=50000]", model="gpt-image-2", n=2)
    pending = await sim.query(task["id"])
    assert pending == {
        "id": task["id"],
        "object": "image.generation.task",
        "type": "image",
        "model": "gpt-image-2",
        "status": "pending",
        "progress": 0,
        "created": task["created"],
        "task_info": {"can_cancel": True},
    }
    await sim.client.post(f"/_sim/tasks/{task['id']}/complete")
    done = await sim.query(task["id"])
    assert done.keys() == PUBLISHED_KEYS | {"results"}
    assert (done["status"], done["progress"], done["task_info"]) == (
        "completed",
        100,
        {"can_cancel": False},
    )
    assert done["results"] == [link.url for link in sim.state.tasks[task["id"]].current_links]
    assert len(done["results"]) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("shape", ["published", "envelope", "bare"])
async def test_error_code_fault_names_the_failure(sim: Sim, shape: str) -> None:
    """``error_code`` chooses a failed task's published code, in every shape."""
    prompt = f"[sim:outcome=failed,error_code=content_policy_violation,body={shape}]"
    task = await sim.submit(prompt)
    await sim.wait_status(task["id"], "failed")
    answer = await sim.query(task["id"])
    body = answer["data"] if shape == "envelope" else answer
    assert body["error"]["code"] == "content_policy_violation"
    assert body["error"]["type"] == "task_error"
    assert body["status"] == "failed"


@pytest.mark.asyncio
async def test_unknown_error_code_refuses_the_submission(sim: Sim) -> None:
    """An error code the provider does not publish is a 400 on the prompt; no task is made."""
    body = {"model": "gpt-image-1.5", "prompt": "x [sim:error_code=oops]"}
    response = await sim.client.post("/v1/images/generations", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_sim_directive"
    assert sim.state.tasks == {}


@pytest.mark.asyncio
async def test_global_faults_take_the_new_names(sim: Sim) -> None:
    """``/_sim/faults`` takes the published shape and an error code; a forced failure uses it."""
    response = await sim.client.post(
        "/_sim/faults", json={"body": "bare", "error_code": "service_unavailable"}
    )
    assert response.json()["body"] == "bare"
    assert response.json()["error_code"] == "service_unavailable"
    bad = await sim.client.post("/_sim/faults", json={"error_code": "nope"})
    assert bad.status_code == 400
    task = await sim.submit("[sim:eta=50000]")
    await sim.client.post(f"/_sim/tasks/{task['id']}/complete", json={"outcome": "failed"})
    answer = await sim.query(task["id"])
    assert "object" not in answer  # the bare data object
    assert answer["error"]["code"] == "service_unavailable"


@pytest.mark.asyncio
@pytest.mark.parametrize("shape", ["published", "envelope", "bare"])
async def test_manual_callback_in_each_shape(sim: Sim, receiver: Receiver, shape: str) -> None:
    """``/_sim/tasks/{id}/callback`` sends the shape asked for; a forged completion mints links."""
    task = await sim.submit(
        "[sim:eta=50000]", model="gpt-image-2", n=2, callback_url=receiver.url()
    )
    route = f"/_sim/tasks/{task['id']}/callback"
    response = await sim.client.post(route, json={"status": "completed", "body": shape})
    assert response.status_code == 200
    await wait_for(lambda: len(receiver.requests) == 1)
    body = receiver.requests[0].body
    links = [link.url for link in sim.state.tasks[task["id"]].current_links]
    assert len(links) == 2
    if shape == "published":
        assert body["results"] == links
    else:
        data = body["data"] if shape == "envelope" else body
        assert ("code" in body) is (shape == "envelope")
        assert [image["url"] for image in data["result"]["images"]] == links
    assert sim.state.tasks[task["id"]].status == "pending"  # forged, not real


@pytest.mark.asyncio
async def test_manual_callback_refuses_an_unknown_shape(sim: Sim) -> None:
    """An unknown ``body`` name is a validation error and sends nothing."""
    task = await sim.submit("[sim:eta=50000]", callback_url="http://127.0.0.1:9/x")
    response = await sim.client.post(f"/_sim/tasks/{task['id']}/callback", json={"body": "json"})
    assert response.status_code == 422
    assert sim.state.tasks[task["id"]].attempts == []


@pytest.mark.asyncio
async def test_bare_shape_is_the_envelope_data(make_sim: SimFactory) -> None:
    """``body_shape="bare"`` answers the enveloped shape's data object without the envelope."""
    sim = await make_sim(body_shape="bare")
    task = await sim.submit("[sim:eta=7]")
    await sim.client.post(f"/_sim/tasks/{task['id']}/complete")
    bare = await sim.query(task["id"])
    assert bare["estimated_time"] == 7
    assert "code" not in bare
    (image,) = bare["result"]["images"]
    assert image["url"] == sim.state.tasks[task["id"]].current_links[0].url
