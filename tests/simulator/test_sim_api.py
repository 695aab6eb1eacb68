"""Submit and query as the provider answers them: shapes, auth, validation, timeline."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from .helpers import AUTH, Sim, SimFactory

SUBMIT = "/v1/images/generations"


def error_of(response: Any) -> dict[str, Any]:
    """The provider's error object, checking its shape."""
    error: dict[str, Any] = response.json()["error"]
    assert {"code", "message", "type"} <= error.keys()
    return error


@pytest.mark.asyncio
async def test_submit_returns_the_task_object(sim: Sim) -> None:
    """The submit answer matches the provider's example field for field."""
    task = await sim.submit(size="1:1", quality="low")
    assert re.fullmatch(r"task-unified-\d+-[a-z0-9]{8}", task["id"])
    assert abs(task["created"] - time.time()) < 5
    assert task == {
        "created": task["created"],
        "id": task["id"],
        "model": "gpt-image-1.5",
        "object": "image.generation.task",
        "progress": 0,
        "status": "pending",
        "task_info": {"can_cancel": True, "estimated_time": 100},
        "type": "image",
        "usage": {"billing_rule": "per_call", "credits_reserved": 2.5, "user_group": "default"},
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic sim-key", "sim-key"])
async def test_bad_key_is_refused(sim: Sim, header: str | None) -> None:
    """Submit and query need the bearer key; refusals use the provider's shape."""
    headers = {"Authorization": header} if header else {}
    body = {"model": "gpt-image-1.5", "prompt": "x"}
    response = await sim.client.post(SUBMIT, json=body, headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "unauthorized"
    assert error_of(response)["type"] == "authentication_error"
    response = await sim.client.get("/v1/tasks/task-unified-1-abcdefgh", headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "unauthorized"
    assert sim.state.tasks == {}


def valid(**fields: Any) -> dict[str, Any]:
    """A valid submit body with ``fields`` changed."""
    return {"model": "gpt-image-1.5", "prompt": "x", **fields}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x"}, 400, "model"),
        (valid(model="dall-e-3"), 400, "model"),
        ({"model": "gpt-image-1.5"}, 400, "prompt"),
        (valid(prompt="   "), 400, "prompt"),
        (valid(prompt="x" * 8001), 400, "prompt"),
        (valid(prompt=5), 422, "prompt"),
        (valid(size="512x512"), 400, "size"),
        (valid(quality="ultra"), 400, "quality"),
        (valid(quality=""), 400, "quality"),
        (valid(n=2), 400, "n"),
        (valid(n="1"), 422, "n"),
        (valid(image_urls=[]), 400, "image_urls"),
        (valid(image_urls=["https://a/b.png"] * 17), 400, "image_urls"),
        (valid(image_urls="https://a/b.png"), 422, "image_urls"),
        (valid(image_urls=["ftp://a/b.png"]), 400, "image_urls"),
        (valid(callback_url="ftp://a/b"), 400, "callback_url"),
        (valid(callback_url="https://a/" + "b" * 2048), 400, "callback_url"),
        (valid(prompt="x [sim:dupe=2]"), 400, "prompt"),
    ],
)
@pytest.mark.asyncio
async def test_invalid_submissions_are_refused(
    sim: Sim, body: dict[str, Any], status: int, param: str
) -> None:
    """Each provider rule answers 400 (bad value) or 422 (bad type), naming the field."""
    response = await sim.client.post(SUBMIT, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param
    assert sim.state.tasks == {}


@pytest.mark.asyncio
async def test_body_must_be_a_json_object(sim: Sim) -> None:
    """Malformed JSON and non-objects answer 422."""
    response = await sim.client.post(SUBMIT, content=b"{nope", headers=AUTH)
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_json"
    response = await sim.client.post(SUBMIT, json=["x"], headers=AUTH)
    assert response.status_code == 422


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://127.0.0.1/hook",
        "https://10.1.2.3/h",
        "https://localhost/h",
    ],
)
async def test_strict_mode_requires_public_https_callbacks(make_sim: SimFactory, url: str) -> None:
    """Without allow_http_callbacks, http and internal callback addresses are refused."""
    sim = await make_sim(allow_http_callbacks=False)
    body = {"model": "gpt-image-1.5", "prompt": "x", "callback_url": url}
    response = await sim.client.post(SUBMIT, json=body, headers=AUTH)
    assert response.status_code == 400
    assert error_of(response)["param"] == "callback_url"


@pytest.mark.asyncio
async def test_strict_mode_accepts_public_https(make_sim: SimFactory) -> None:
    """A public https callback URL and gpt-image-2 are accepted."""
    sim = await make_sim(allow_http_callbacks=False, time_scale=100)
    task = await sim.submit(model="gpt-image-2", callback_url="https://hooks.example.com/x?t=1")
    assert task["model"] == "gpt-image-2"


@pytest.mark.asyncio
async def test_unknown_task_is_404(sim: Sim) -> None:
    """Querying an unknown id answers 404 task_not_found in the provider's shape."""
    response = await sim.client.get("/v1/tasks/task-unified-1-zzzzzzzz", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["code"] == "task_not_found"


@pytest.mark.asyncio
@pytest.mark.parametrize("task_id", ["1757156493-imcg5zqt", "task-1-abc", "TASK-UNIFIED-1-a"])
async def test_malformed_task_id_is_400(sim: Sim, task_id: str) -> None:
    """An id not starting with ``task-unified-`` answers 400 invalid_task_id on task_id."""
    response = await sim.client.get(f"/v1/tasks/{task_id}", headers=AUTH)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("invalid_task_id", "task_id")


@pytest.mark.asyncio
async def test_timeline_moves_forward_to_completed(make_sim: SimFactory) -> None:
    """pending, then processing with rising progress, then completed with its results."""
    sim = await make_sim(time_scale=0.005)  # 0.5 s in all
    task = await sim.submit(prompt="[sim:eta=100]")
    first = await sim.query(task["id"])
    assert (first["status"], first["progress"]) == ("pending", 0)
    assert first["task_info"] == {"can_cancel": True}
    seen: list[tuple[str, int]] = []
    while (answer := await sim.query(task["id"]))["status"] != "completed":
        seen.append((answer["status"], answer["progress"]))
        await asyncio.sleep(0.02)
    assert any(status == "processing" for status, _ in seen)
    progresses = [progress for _, progress in seen]
    assert progresses == sorted(progresses)
    assert answer["progress"] == 100
    assert answer["task_info"] == {"can_cancel": False}
    (url,) = answer["results"]
    assert url.startswith("http://sim/files/")
    assert "error" not in answer


@pytest.mark.asyncio
async def test_enveloped_timeline_reports_times_and_expiry(make_sim: SimFactory) -> None:
    """In the enveloped shape a completed task carries completed, actual_time and expires_at."""
    sim = await make_sim(time_scale=0.005, body_shape="envelope")
    task = await sim.submit(prompt="[sim:eta=100]")
    assert (await sim.query_data(task["id"]))["status"] == "pending"
    await sim.wait_status(task["id"], "completed")
    data = await sim.query_data(task["id"])
    assert data["progress"] == 100
    assert data["completed"] >= data["created"]
    assert 80 <= data["actual_time"] <= 200  # simulated seconds
    assert data["estimated_time"] == 100
    (image,) = data["result"]["images"]
    assert isinstance(image["url"], str)
    assert image["url"].startswith("http://sim/files/")
    assert abs(image["expires_at"] - (data["completed"] + 86_400)) <= 2
    assert "error" not in data


@pytest.mark.asyncio
async def test_eta_directive_overrides_estimated_time(sim: Sim) -> None:
    """``eta`` changes the reported estimated_time and the timeline."""
    task = await sim.submit(prompt="[sim:eta=7,body=envelope]")
    assert task["task_info"]["estimated_time"] == 7
    assert (await sim.query_data(task["id"]))["estimated_time"] == 7


@pytest.mark.asyncio
async def test_url_list_shape(sim: Sim) -> None:
    """``url=list`` gives images[].url as a list of strings in the enveloped shapes only."""
    task = await sim.submit(prompt="[sim:body=envelope,url=list]")
    await sim.wait_status(task["id"], "completed")
    (image,) = (await sim.query_data(task["id"]))["result"]["images"]
    assert isinstance(image["url"], list)
    assert image["url"][0].startswith("http://sim/files/")
    published = await sim.completed("[sim:url=list]")
    assert all(isinstance(url, str) for url in published["results"])


@pytest.mark.asyncio
@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
async def test_outcome_fault(sim: Sim, outcome: str) -> None:
    """``outcome`` ends the task failed (with a task_error) or cancelled, without results."""
    task = await sim.submit(prompt=f"[sim:outcome={outcome}]")
    await sim.wait_status(task["id"], outcome)
    answer = await sim.query(task["id"])
    assert answer["status"] == outcome
    assert answer["task_info"] == {"can_cancel": False}
    assert "results" not in answer
    assert ("error" in answer) is (outcome == "failed")
    if outcome == "failed":
        assert answer["error"] == {
            "code": "generation_failed_no_content",
            "message": "The simulator failed this task on request.",
            "type": "task_error",
        }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_parameters"),
        (401, "unauthorized"),
        (402, "quota_exceeded"),
        (403, "permission_denied"),
        (429, "rate_limit_exceeded"),
        (500, "internal_error"),
        (503, "http_503"),
        (418, "http_418"),
    ],
)
async def test_submit_status_refuses_by_published_code(sim: Sim, status: int, code: str) -> None:
    """``submit_status`` refuses with the published code; only 429 carries Retry-After."""
    body = {"model": "gpt-image-1.5", "prompt": f"x [sim:submit_status={status}]"}
    response = await sim.client.post(SUBMIT, json=body, headers=AUTH)
    assert response.status_code == status
    assert error_of(response)["code"] == code
    assert response.headers.get("retry-after") == ("1" if status == 429 else None)
    assert sim.state.tasks == {}


@pytest.mark.asyncio
async def test_refused_submits_are_counted_without_a_task(sim: Sim) -> None:
    """Refused submissions are counted as requests and refusals, never as tasks."""
    body = {"model": "gpt-image-1.5", "prompt": "x [sim:submit_status=429]"}
    assert (await sim.client.post(SUBMIT, json=body, headers=AUTH)).status_code == 429
    body["prompt"] = "x [sim:submit_status=503]"
    assert (await sim.client.post(SUBMIT, json=body, headers=AUTH)).status_code == 503
    assert sim.state.tasks == {}
    stats = (await sim.client.get("/_sim/stats")).json()
    assert (stats["submit_requests"], stats["rejected_submits"], stats["submits"]) == (2, 2, 0)


@pytest.mark.asyncio
async def test_submit_delay_creates_the_task_before_answering(make_sim: SimFactory) -> None:
    """``submit_delay`` holds the answer while the task already exists (a read-timeout case)."""
    sim = await make_sim(time_scale=100)
    call = asyncio.ensure_future(sim.submit(prompt="[sim:submit_delay=0.3]"))
    await asyncio.sleep(0.1)
    assert len(sim.state.tasks) == 1
    assert not call.done()
    task = await call
    assert task["id"] in sim.state.tasks
