"""`imagetasks events` (the feed, and --follow on the stream) and `submit --wait` settling."""

from __future__ import annotations

import json
import subprocess
import threading
from queue import Empty, Queue

import httpx

from .helpers import IMAGETASKS, Sandbox, clean_env


def test_submit_wait_ends_settled_and_events_prints_the_tasks_story(sandbox: Sandbox) -> None:
    """After `submit --wait`, the task is settled and `events --json` holds its whole story."""
    waited = sandbox.run("submit", "a harbour at night", "--wait", timeout=90)
    assert waited.code == 0, waited.stderr
    task_id = waited.field("task")
    assert sandbox.api(f"/tasks/{task_id}").json()["settled"] is True
    listed = sandbox.run("events", "--json")
    assert listed.code == 0, listed.stderr
    told = [json.loads(line) for line in listed.stdout.splitlines()]
    mine = [event["type"] for event in told if event["data"]["id"] == task_id]
    assert mine[0] == "task.created"
    assert mine[-2:] == ["task.completed", "image.stored"]
    assert "next: --after " in listed.stderr
    cursor = listed.stderr.split("next: --after ")[1].split()[0]
    assert sandbox.run("events", "--after", cursor, "--json").stdout == ""


def test_events_follow_prints_new_events_as_they_happen(sandbox: Sandbox) -> None:
    """--follow keeps the stream open: a task submitted afterwards shows up, to its image."""
    follower = subprocess.Popen(
        [IMAGETASKS, "events", "--follow", "--json", "--types", "task.created,image.stored"],
        env=clean_env(IMAGETASKS_URL=sandbox.url, IMAGETASKS_TOKEN=sandbox.token),
        cwd=sandbox.directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: Queue[str] = Queue()
    assert follower.stdout is not None
    stdout = follower.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    try:
        submitted = httpx.post(
            sandbox.url + "/tasks",
            json={"prompt": "a kite"},
            headers={"Authorization": f"Bearer {sandbox.token}"},
            timeout=30,
        ).json()
        seen: list[str] = []
        while "image.stored" not in seen:
            try:
                event = json.loads(lines.get(timeout=60))
            except Empty:
                raise AssertionError(f"no more events; saw {seen}") from None
            if event["data"]["id"] == submitted["id"]:
                seen.append(event["type"])
        assert seen == ["task.created", "image.stored"]
    finally:
        follower.terminate()
        follower.wait(timeout=15)
