"""The storm: STORM_TASKS tasks through two replicas on one PostgreSQL database and one
storage directory, with duplicated, shuffled and dropped callbacks; then the same
storm while replicas are killed (SIGKILL) and started again.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.conftest import ClusterPool, Figures
from tests.chaos.storm import (
    SEED,
    ChaosMonkey,
    Clock,
    Planned,
    Shuffled,
    Verdict,
    plan,
    shuffle,
    submit_all,
    verify,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

STORM_TASKS = 200
SETTLE_TIMEOUT = 240.0


def summary(verdict: Verdict, clock: Clock, **extra: Any) -> dict[str, Any]:
    """The figures of one storm."""
    return {
        "seed": SEED,
        "tasks": verdict.tasks,
        "by_status": dict(verdict.by_status),
        "images_stored": verdict.images_stored,
        "image_objects": verdict.image_objects,
        "multi_image_tasks": verdict.multi_image_tasks,
        "image_gets_per_completed_task": dict(verdict.image_gets),
        "callback_attempts": verdict.callback_attempts,
        "callback_answers": dict(verdict.callback_statuses),
        "callback_deliveries_recorded": verdict.deliveries_recorded,
        "callback_latency_ms_seen_by_the_provider": verdict.callback_ms,
        "callback_ms_in_the_replicas": verdict.webhook_ms,
        "tasks_with_dropped_callbacks": verdict.dropped,
        "duplicate_terminal_callbacks": verdict.duplicate_deliveries,
        "late_processing_callbacks": verdict.late_processing,
        "tasks_lost": len(verdict.lost),
        "images_stored_twice": len(verdict.stored_twice),
        "images_with_wrong_bytes": len(verdict.wrong_bytes),
        "tasks_whose_callbacks_were_still_being_sent_when_settled": (
            verdict.callbacks_pending_when_settled
        ),
        "variant_temp_files_awaiting_sweep": verdict.variant_temps_awaiting_sweep,
        "seconds": clock(),
        **extra,
    }


async def run_storm(cluster: Cluster, tasks: list[Planned], rng: random.Random) -> Shuffled:
    """Submit everything while the shuffler runs; what the shuffler delivered."""
    stop = asyncio.Event()
    shuffler = asyncio.create_task(shuffle(cluster, tasks, rng, stop))
    try:
        await submit_all(cluster, tasks)
        await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=len(tasks))
    finally:
        stop.set()
        shuffled = await shuffler
    return shuffled


async def test_storm_with_both_replicas_up(clusters: ClusterPool, figures: Figures) -> None:
    """200 tasks, duplicated/shuffled/dropped callbacks, 2 replicas: nothing lost, one GET each."""
    clock = Clock()
    rng = random.Random(SEED)
    cluster = await clusters.start("postgres", replicas=2)
    tasks = plan(STORM_TASKS, rng)
    shuffled = await run_storm(cluster, tasks, rng)
    verdict = await verify(cluster, tasks)
    webhook = cluster.proxy.webhook_records()
    per_replica = Counter(record.replica for record in webhook)
    figures.record(
        "storm",
        **summary(verdict, clock),
        shuffled_callbacks=shuffled.sent,
        callbacks_per_replica=dict(per_replica),
    )
    assert verdict.lost == []
    assert verdict.problems == [], "\n".join(verdict.problems)
    assert verdict.stored_twice == []
    assert verdict.wrong_bytes == []
    assert verdict.multi_image_tasks > 0, "the storm covers tasks with several images"
    assert all(task.task_id for task in tasks), "every POST /tasks got its 202"
    # Both replicas are up the whole time: no callback gets a 5xx, or anything but 200.
    assert set(verdict.callback_statuses) == {200}
    assert set(shuffled.statuses) == {200}
    assert {record.status for record in webhook} == {200}
    assert min(per_replica.values()) > 0, "callbacks reached both replicas"


KILL_MOMENTS = [
    "mid-submit",
    "mid-download",
    "mid-callback",
    "random",
    "mid-download",
    "mid-callback",
]
# Spreads the submissions over the monkey's run (8 submitters, about 40 s in all).
CRASH_PACE = 1.5


async def test_storm_with_replicas_killed(clusters: ClusterPool, figures: Figures) -> None:
    """The storm while replicas are SIGKILLed mid-submit/download/callback: nothing lost."""
    clock = Clock()
    rng = random.Random(SEED + 1)
    cluster = await clusters.start("postgres", replicas=2, SUBMIT_UNKNOWN_AFTER_SECONDS=30)
    tasks = plan(STORM_TASKS, rng)
    monkey = ChaosMonkey(cluster, tasks, rng)
    stop = asyncio.Event()
    shuffler = asyncio.create_task(shuffle(cluster, tasks, rng, stop))
    try:
        await asyncio.gather(submit_all(cluster, tasks, pace=CRASH_PACE), monkey.run(KILL_MOMENTS))
        await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=len(tasks))
    finally:
        stop.set()
        shuffled = await shuffler
    refetch = {task_id for kill in cluster.kills for task_id in kill.interrupted_downloads}
    verdict = await verify(cluster, tasks, refetch_allowed=refetch, crashes=True)
    webhook = cluster.proxy.webhook_records()
    replica_5xx = [r for r in webhook if r.status >= 500 and r.from_replica]
    healthy_5xx = [r for r in webhook if r.status >= 500 and not r.degraded]
    figures.record(
        "storm_with_kills",
        **summary(verdict, clock),
        shuffled_callbacks=shuffled.sent,
        kills=[f"replica {k.replica} {k.moment}" for k in cluster.kills],
        restarts=cluster.restarts,
        interrupted_downloads=len(refetch),
        callbacks_answered_502_by_the_forwarder=sum(1 for r in webhook if not r.from_replica),
        requests_failed_over_to_the_other_replica=cluster.proxy.failovers,
        timeline=monkey.timeline,
        mid_submit_client_answers=[t.answers for t in tasks[STORM_TASKS:]],
        submissions_never_reaching_the_provider=verdict.unknown_submissions - verdict.answers_died,
        provider_tasks_whose_answer_died_and_that_never_called_back=verdict.answers_died,
    )
    assert verdict.lost == []
    assert verdict.problems == []
    assert verdict.stored_twice == []
    assert verdict.wrong_bytes == []
    assert verdict.multi_image_tasks > 0, "the storm covers tasks with several images"
    assert [k.moment for k in cluster.kills].count("mid-download") == 2
    assert replica_5xx == [], "a replica itself answered a callback with 5xx"
    assert healthy_5xx == [], "a callback got a 5xx while both replicas were up"


ROLLING_TASKS = 80


async def test_rolling_graceful_restart_under_load(clusters: ClusterPool, figures: Figures) -> None:
    """Each replica stopped (SIGTERM) and started again while tasks flow: nothing lost."""
    clock = Clock()
    rng = random.Random(SEED + 2)
    cluster = await clusters.start("postgres", replicas=2)
    tasks = plan(ROLLING_TASKS, rng)

    async def roll() -> None:
        for index in range(len(cluster.replicas)):
            await asyncio.sleep(4)
            await cluster.restart_gracefully(index)

    await asyncio.gather(submit_all(cluster, tasks, pace=2.0), roll())
    await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=len(tasks))
    verdict = await verify(cluster, tasks)
    webhook = cluster.proxy.webhook_records()
    figures.record(
        "rolling_restart",
        **summary(verdict, clock),
        graceful_restarts=cluster.restarts,
        callbacks_answered_502_by_the_forwarder=sum(1 for r in webhook if not r.from_replica),
        requests_failed_over_to_the_other_replica=cluster.proxy.failovers,
        leases_released_on_stop=sum(
            line.get("released_leases", 0) for line in cluster.service_logs("worker_stopped")
        ),
    )
    assert verdict.lost == []
    assert verdict.problems == []
    assert [r for r in webhook if r.status >= 500 and r.from_replica] == []
    assert [r for r in webhook if r.status >= 500 and not r.degraded] == []
