"""Watchers across replicas: while storm tasks run on two PostgreSQL replicas and each
replica is killed in turn, an SSE stream client per replica (resuming with Last-Event-ID
on whichever replica answers when its own dies) and a `Prefer: wait` waiter per task on
the replica it was not submitted to see every settled task, none missed."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.conftest import ClusterPool, Figures
from tests.chaos.storm import SEED, Clock, Planned, plan, submit_one
from tests.e2e.stack import wait_for

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

TASKS = 60
WAIT_SECONDS = 20
# A waiter answered "not settled" this long after the task's settling event committed
# missed that event (the event's timestamp is taken just before its commit).
MISS_MARGIN_SECONDS = 1.0
SETTLE_TIMEOUT = 120.0
PACE_SECONDS = 0.1  # between submissions


@dataclass
class Stream:
    """One SSE client: what it received, in order, and how often it had to reconnect."""

    home: int
    events: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    resumed_elsewhere: int = 0
    cursor: str | None = None


@dataclass
class Wait:
    """One `Prefer: wait` answer: when asked, when answered, settled or not."""

    task_id: str
    asked: float
    answered: float
    settled: bool


async def follow(cluster: Cluster, stream: Stream, stop: asyncio.Event) -> None:
    """Read the stream from its home replica; when the connection drops, resume from the
    last id on the first replica that answers (the other one first)."""
    replica = stream.home
    while not stop.is_set():
        headers = {"Accept": "text/event-stream"}
        if stream.cursor is not None:
            headers["Last-Event-ID"] = stream.cursor
        try:
            async with cluster.clients[replica].stream(
                "GET", "/events/stream", headers=headers, timeout=httpx.Timeout(5, read=None)
            ) as response:
                assert response.status_code == 200, await response.aread()
                frame: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line:
                        name, _, value = line.partition(": ")
                        frame[name] = value
                        continue
                    # A blank line ends a frame: only a whole frame counts as received.
                    if "data" in frame:
                        stream.events.append(json.loads(frame["data"]))
                        stream.cursor = frame["id"]
                    frame = {}
                    if stop.is_set():
                        return
        except (httpx.TransportError, httpx.RemoteProtocolError):
            pass
        if stop.is_set():
            return
        stream.reconnects += 1
        replica = (replica + 1) % len(cluster.clients)
        if replica != stream.home:
            stream.resumed_elsewhere += 1
        await asyncio.sleep(0.2)


async def wait_settled(cluster: Cluster, task_id: str, replica: int, waits: list[Wait]) -> int:
    """Ask with `Prefer: wait` until the task is settled; the reconnects it took."""
    reconnects = 0
    while True:
        asked = time.time()
        try:
            response = await cluster.clients[replica].get(
                f"/tasks/{task_id}",
                headers={"Prefer": f"wait={WAIT_SECONDS}"},
                timeout=WAIT_SECONDS + 10,
            )
        except httpx.TransportError:
            reconnects += 1
            replica = (replica + 1) % len(cluster.clients)
            await asyncio.sleep(0.2)
            continue
        assert response.status_code == 200, response.text
        assert response.headers["preference-applied"] == f"wait={WAIT_SECONDS}"
        settled = bool(response.json()["settled"])
        waits.append(Wait(task_id, asked, time.time(), settled))
        if settled:
            return reconnects


async def submit_and_wait(
    cluster: Cluster, tasks: list[Planned], waits: list[Wait], submitted: list[str]
) -> list[int]:
    """Submit each task to one replica, then wait for it on the other; reconnects per task."""

    async def one(task: Planned) -> int:
        await asyncio.sleep(task.index * PACE_SECONDS)
        home = task.index % len(cluster.clients)
        # A kill can leave the first attempt in flight (409) until it is settled as
        # unknown after SUBMIT_UNKNOWN_AFTER_SECONDS: keep asking with the same key.
        for _ in range(5):
            await submit_one(cluster, task, home)
            if task.task_id is not None:
                break
        assert task.task_id is not None, task.answers
        submitted.append(task.task_id)
        return await wait_settled(cluster, task.task_id, (home + 1) % 2, waits)

    return list(await asyncio.gather(*(one(task) for task in tasks)))


async def kill_each(cluster: Cluster, timeline: list[str], clock: Clock) -> None:
    """Kill each replica in turn while tasks run, and start it again."""
    for index in range(len(cluster.replicas)):
        await asyncio.sleep(2.5)
        rows = await cluster.query(
            "SELECT count(*) FROM tasks WHERE status NOT IN ('completed', 'failed', "
            "'cancelled') OR (status = 'completed' AND image_status NOT IN ('stored', 'failed'))"
        )
        await cluster.kill(index, "random")
        timeline.append(f"{clock()} s: killed replica {index}, {rows[0][0]} tasks unsettled")
        await asyncio.sleep(1.5)
        await cluster.restart(index)
        timeline.append(f"{clock()} s: replica {index} ready again")


async def test_streams_and_waiters_see_every_settled_task(
    clusters: ClusterPool, figures: Figures
) -> None:
    """Each stream gets every event of the log once, every settled task included, across
    kills and reconnects; no waiter is answered unsettled after its task settled."""
    clock = Clock()
    rng = random.Random(SEED + 13)
    cluster = await clusters.start("postgres", replicas=2, SUBMIT_UNKNOWN_AFTER_SECONDS=10)
    tasks = plan(TASKS, rng, slow_share=0.0)
    for task in tasks:
        # No dropped callbacks: a kill while a replica holds a task's 60 s poll lease
        # would hold that task (and the test) up for a minute; the storms cover drops.
        task.prompt = task.prompt.replace("storm task", "watched task").replace(",drop", "")
    stop = asyncio.Event()
    streams = [Stream(home) for home in range(len(cluster.clients))]
    following = [asyncio.create_task(follow(cluster, s, stop)) for s in streams]
    waits: list[Wait] = []
    submitted: list[str] = []
    timeline: list[str] = []
    try:
        # Every stream is open (its retry line read) before the first task exists.
        await asyncio.sleep(1.0)
        waiter_reconnects, _ = await asyncio.gather(
            submit_and_wait(cluster, tasks, waits, submitted), kill_each(cluster, timeline, clock)
        )
        await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=len(tasks))
        log = await cluster.query(
            "SELECT id, task_id, created_at FROM events ORDER BY task_id, txid, seq"
        )
        expected_ids = {row[0] for row in log}

        async def caught_up() -> bool:
            return all(expected_ids <= {e["id"] for e in s.events} for s in streams)

        await wait_for(caught_up, timeout=30, interval=0.2, what="the streams to catch up")
    finally:
        stop.set()
        await asyncio.sleep(0.1)
        for following_task in following:
            following_task.cancel()
        await asyncio.gather(*following, return_exceptions=True)

    settled_at: dict[str, float] = {}
    per_task: dict[str, list[str]] = {}
    for event_id, task_id, created_at in log:
        per_task.setdefault(task_id, []).append(event_id)
        settled_at[task_id] = _timestamp(created_at)  # the last event settles the task
    report: dict[str, Any] = {
        "seed": SEED,
        "tasks": len(submitted),
        "events_in_log": len(log),
        "timeline": timeline,
    }
    for stream in streams:
        counts = Counter(e["id"] for e in stream.events)
        seen_settled = {e["data"]["id"] for e in stream.events if e["data"].get("settled")}
        order = {}
        for event in stream.events:
            order.setdefault(event["data"]["id"], []).append(event["id"])
        report[f"stream_on_replica_{stream.home}"] = {
            "events": len(stream.events),
            "settled_tasks_seen": len(seen_settled & set(submitted)),
            "missed_events": len(expected_ids - set(counts)),
            "missed_settled_tasks": len(set(submitted) - seen_settled),
            "duplicates": sum(n - 1 for n in counts.values()),
            "tasks_out_of_order": sum(1 for t, ids in per_task.items() if order.get(t) != ids),
            "reconnects": stream.reconnects,
            "resumed_on_the_other_replica": stream.resumed_elsewhere,
        }
    missed_waits = [
        w
        for w in waits
        if not w.settled and w.answered - settled_at[w.task_id] > MISS_MARGIN_SECONDS
    ]
    answered = {w.task_id for w in waits if w.settled}
    report["waiters"] = {
        "tasks": len(submitted),
        "answered_settled": len(answered & set(submitted)),
        "waits": len(waits),
        "waits_that_ran_out_unsettled": sum(1 for w in waits if not w.settled),
        "missed": len(missed_waits),
        "reconnects": sum(waiter_reconnects),
    }
    report["seconds"] = clock()
    figures.record("event_watchers", **report)
    assert len(submitted) == TASKS
    for stream in streams:
        figures_of = report[f"stream_on_replica_{stream.home}"]
        assert figures_of["missed_settled_tasks"] == 0, figures_of
        assert figures_of["missed_events"] == 0, figures_of
        assert figures_of["duplicates"] == 0, figures_of
        assert figures_of["tasks_out_of_order"] == 0, figures_of
    assert answered == set(submitted)
    assert missed_waits == [], missed_waits[:5]
    # The kills really cut the streams off: each had to resume.
    assert all(stream.reconnects >= 1 for stream in streams), report


def _timestamp(value: datetime | str) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.timestamp()
