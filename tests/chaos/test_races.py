"""Races across the two replicas: one Idempotency-Key sent by many clients at once to
both, and one task's terminal callback delivered fifty times at once to both."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.chaos.cluster import Cluster, expected_png_sha256
from tests.chaos.conftest import ClusterPool, Figures
from tests.e2e.stack import wait_for

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

CLIENTS = 16
HERD = 50  # the simulator's largest concurrent_dup


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(module_clusters: ClusterPool) -> Cluster:
    """Two replicas on one database."""
    return await module_clusters.start("postgres", replicas=2)


async def post_many(cluster: Cluster, body: dict[str, Any], key: str) -> list[httpx.Response]:
    """``CLIENTS`` simultaneous POST /tasks with one key, alternating replicas."""
    return await asyncio.gather(
        *(
            cluster.clients[n % len(cluster.clients)].post(
                "/tasks", json=body, headers={"Idempotency-Key": key}
            )
            for n in range(CLIENTS)
        )
    )


async def test_one_idempotency_key_from_many_clients_is_billed_once(
    pair: Cluster, figures: Figures
) -> None:
    """16 simultaneous submits with one key on both replicas: one provider task, one row."""
    cluster = pair
    before = (await cluster.sim.stats())["submit_requests"]
    # The provider answers 2 s late, so most of the clients arrive while the first is in flight.
    body = {"prompt": "one key, many clients [sim:submit_delay=2]"}
    first = await post_many(cluster, body, "race-key-1")
    codes = Counter(response.status_code for response in first)
    assert set(codes) <= {202, 409}, codes
    assert codes[202] >= 1

    async def replayed() -> str | None:
        response = await cluster.client.post(
            "/tasks", json=body, headers={"Idempotency-Key": "race-key-1"}
        )
        return response.json()["id"] if response.status_code == 202 else None

    task_id = await wait_for(replayed, timeout=90, interval=1, what="the replay of the key")
    ids = {r.json()["id"] for r in first if r.status_code == 202}
    assert ids == {task_id}
    assert (await cluster.sim.stats())["submit_requests"] == before + 1
    rows = await cluster.query("SELECT count(*) FROM tasks WHERE prompt = :p", p=body["prompt"])
    assert rows[0][0] == 1

    # The same key with another body, from many clients at once: refused, never billed.
    other = await post_many(cluster, {"prompt": "another body"}, "race-key-1")
    assert {r.status_code for r in other} == {422}
    assert (await cluster.sim.stats())["submit_requests"] == before + 1
    figures.record(
        "idempotency_race", clients=CLIENTS, first_answers=dict(codes), provider_submits=1
    )


async def test_fifty_simultaneous_callbacks_apply_once(pair: Cluster, figures: Figures) -> None:
    """A terminal callback sent 50 times at once over both replicas: all 200, applied once."""
    cluster = pair
    task = await cluster.submit(f"a stampede [sim:concurrent_dup={HERD}]")
    upstream = task["upstream_task_id"]
    done = await cluster.wait_image(task["id"], timeout=90)
    assert done["image"]["status"] == "stored"

    async def all_delivered() -> list[dict[str, Any]] | None:
        attempts = (await cluster.sim.task(upstream))["callback_attempts"]
        return attempts if len(attempts) >= HERD else None

    attempts = await wait_for(all_delivered, timeout=60, what="the herd of callbacks")
    assert [a["status_code"] for a in attempts] == [200] * HERD
    rows = await cluster.query(
        "SELECT outcome, count(*) FROM callback_deliveries WHERE task_id = :id GROUP BY outcome",
        id=task["id"],
    )
    outcomes = dict(rows)
    assert sum(outcomes.values()) == HERD
    provider = await cluster.sim.task(upstream)
    assert provider["image_gets"] == 1
    assert done["image"]["sha256"] == expected_png_sha256(upstream)
    terminal = [
        line
        for line in cluster.service_logs("task_transition", task_id=task["id"])
        if line.get("status") == "completed"
    ]
    assert len(terminal) == 1
    per_replica = Counter(
        r.replica for r in cluster.proxy.webhook_records() if task["id"] in r.path
    )
    assert len(per_replica) == 2, per_replica
    figures.record(
        "callback_herd",
        deliveries=HERD,
        outcomes=outcomes,
        per_replica=dict(per_replica),
        provider_queries=provider["queries"],
    )
