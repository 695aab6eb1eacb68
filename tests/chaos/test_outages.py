"""Outages of what the replicas share: the PostgreSQL server is stopped for a few seconds
while callbacks arrive, and the storage directory disappears while images complete.

Each scenario runs once (a module fixture) and its tests check what it observed.
The tasks wait at the provider (a long eta) until the outage begins, then the
test finishes them all at once, so their callbacks and downloads meet the outage.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from tests.chaos.cluster import Cluster
from tests.chaos.conftest import ClusterPool, Figures
from tests.chaos.storm import Planned, Verdict, submit_all, verify
from tests.e2e.stack import wait_for
from tests.postgres import POSTGRES_URL

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

OUTAGE_TASKS = 12
WAITING_PROMPT = "outage task {index} [sim:eta=50000{drop}]"  # 1000 s: the test ends it
SETTLE_TIMEOUT = 180.0
POSTGRES_CONFIG = Path("/etc/postgresql")


def outage_tasks() -> list[Planned]:
    """Tasks that wait at the provider; every fourth gets no callback at all."""
    tasks = []
    for index in range(OUTAGE_TASKS):
        drop = index % 4 == 3
        prompt = WAITING_PROMPT.format(index=index, drop=",drop" if drop else "")
        tasks.append(Planned(index, prompt, "completed", drop, 0 if drop else 1, False, False))
    return tasks


async def submit_waiting(cluster: Cluster, tasks: list[Planned]) -> dict[str, str]:
    """Submit the tasks; our id -> the provider's id."""
    await submit_all(cluster, tasks)
    rows = await cluster.query("SELECT id, upstream_task_id FROM tasks")
    return dict(rows)


async def readiness(cluster: Cluster, replica: int) -> tuple[int, dict[str, Any]]:
    """GET /readyz on one replica: status code and body."""
    response = await cluster.clients[replica].get("/readyz", timeout=15)
    return response.status_code, response.json()


async def wait_readiness(cluster: Cluster, replica: int, status: int) -> dict[str, Any]:
    """Poll /readyz until it answers ``status``; the body then."""

    async def probe() -> dict[str, Any] | None:
        code, body = await readiness(cluster, replica)
        return body if code == status else None

    return await wait_for(probe, timeout=60, interval=0.2, what=f"/readyz {status} on {replica}")


async def finish_all(cluster: Cluster, upstream_ids: list[str]) -> None:
    """Complete every task at the provider now; their callbacks start at once."""
    await asyncio.gather(*(cluster.sim.complete(upstream) for upstream in upstream_ids))


# -- PostgreSQL restart ---------------------------------------------------------------


def postgres_cluster_version() -> str | None:
    """The local cluster's version, when this machine runs the test server and we may restart it."""
    host = make_url(POSTGRES_URL).host
    if host not in ("127.0.0.1", "localhost") or shutil.which("pg_ctlcluster") is None:
        return None
    if os.geteuid() != 0 or not POSTGRES_CONFIG.is_dir():
        return None
    versions = sorted(p.name for p in POSTGRES_CONFIG.iterdir() if (p / "main").is_dir())
    return versions[-1] if versions else None


def pg_ctl(version: str, action: str) -> None:
    """``pg_ctlcluster`` on the local server's main cluster (fast shutdown)."""
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass
class PostgresOutage:
    """What the PostgreSQL restart scenario saw."""

    cluster: Cluster
    readyz_during: list[dict[str, Any]]
    readyz_after: list[dict[str, Any]]
    callback_answers_during: list[int]
    submit_during: int
    submits_before: int
    submits_after: int
    downtime: float
    verdict: Verdict
    pids_before: list[int | None] = field(default_factory=list)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pg_outage(module_clusters: ClusterPool, figures: Figures) -> PostgresOutage:
    """Stop the PostgreSQL server while every task's callback arrives, then start it again."""
    version = postgres_cluster_version()
    if version is None:
        pytest.skip("needs root and the local PostgreSQL cluster (pg_ctlcluster)")
    cluster = await module_clusters.start("postgres", replicas=2)
    tasks = outage_tasks()
    upstream = await submit_waiting(cluster, tasks)
    pids = [replica.pid for replica in cluster.replicas]
    submits_before = (await cluster.sim.stats())["submit_requests"]
    called_back = [upstream[t.task_id] for t in tasks if t.task_id and not t.drop]

    async def failed_callback() -> list[int] | None:
        attempts = (await cluster.sim.task(called_back[0]))["callback_attempts"]
        codes = [a["status_code"] or 0 for a in attempts]
        return codes if any(code >= 500 for code in codes) else None

    stopped = time.monotonic()
    await asyncio.to_thread(pg_ctl, version, "stop")
    try:
        await finish_all(cluster, list(upstream.values()))
        during = [await wait_readiness(cluster, i, 503) for i in range(len(cluster.replicas))]
        refused = await cluster.client.post("/tasks", json={"prompt": "while the database is down"})
        answers = await wait_for(failed_callback, timeout=30, interval=0.1, what="a 5xx callback")
    finally:
        await asyncio.to_thread(pg_ctl, version, "start")
    downtime = time.monotonic() - stopped
    after = [await wait_readiness(cluster, i, 200) for i in range(len(cluster.replicas))]
    await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=len(tasks))
    verdict = await verify(cluster, tasks)
    submits_after = (await cluster.sim.stats())["submit_requests"]
    figures.record(
        "postgres_restart",
        tasks=verdict.tasks,
        downtime_seconds=round(downtime, 1),
        callback_answers=dict(verdict.callback_statuses),
        submit_during_outage=refused.status_code,
        tasks_lost=len(verdict.lost),
        images_stored=verdict.images_stored,
        image_gets_per_completed_task=dict(verdict.image_gets),
        problems=verdict.problems,
    )
    return PostgresOutage(
        cluster,
        during,
        after,
        answers,
        refused.status_code,
        submits_before,
        submits_after,
        downtime,
        verdict,
        pids,
    )


async def test_postgres_down_makes_readyz_not_ready(pg_outage: PostgresOutage) -> None:
    """While PostgreSQL is down, /readyz says not ready on both replicas, naming the database."""
    for body in pg_outage.readyz_during:
        assert body["status"] == "not_ready"
        assert body["checks"]["database"].startswith("unavailable")
        assert body["checks"]["storage"] == "ok"


async def test_postgres_down_callbacks_get_5xx_so_the_provider_retries(
    pg_outage: PostgresOutage,
) -> None:
    """A callback that cannot be recorded is answered 5xx (retried), then succeeds later."""
    answers = pg_outage.callback_answers_during
    assert any(code >= 500 for code in answers), answers
    assert 200 in pg_outage.verdict.callback_statuses


async def test_postgres_down_submit_is_refused_and_never_sent(pg_outage: PostgresOutage) -> None:
    """POST /tasks during the outage fails with a 5xx and nothing reaches the provider."""
    assert pg_outage.submit_during >= 500
    assert pg_outage.submits_after == pg_outage.submits_before


async def test_postgres_down_submit_answers_503(pg_outage: PostgresOutage) -> None:
    """The submit refused during the outage says so with a 503, like a storage outage."""
    assert pg_outage.submit_during == 503


async def test_postgres_restart_service_recovers_by_itself(pg_outage: PostgresOutage) -> None:
    """Same processes, ready again, every task completed and stored once, nothing lost."""
    cluster = pg_outage.cluster
    assert [replica.pid for replica in cluster.replicas] == pg_outage.pids_before
    assert all(replica.running for replica in cluster.replicas)
    assert all(body["status"] == "ready" for body in pg_outage.readyz_after)
    verdict = pg_outage.verdict
    assert verdict.lost == []
    assert verdict.problems == []
    assert verdict.by_status == {"completed": OUTAGE_TASKS}
    assert verdict.images_stored == OUTAGE_TASKS


# -- storage outage -------------------------------------------------------------------


@dataclass
class StorageOutage:
    """What the storage outage scenario saw."""

    cluster: Cluster
    readyz_during: list[dict[str, Any]]
    readyz_after: list[dict[str, Any]]
    stored_image_during: int
    attempts_during: list[dict[str, Any]]
    crashed_downloads: int
    verdict: Verdict


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def storage_outage(module_clusters: ClusterPool, figures: Figures) -> StorageOutage:
    """Replace the storage directory with a file while images complete, then put it back."""
    cluster = await module_clusters.start("postgres", replicas=2)
    early = Planned(
        OUTAGE_TASKS,
        f"outage task {OUTAGE_TASKS} [sim:eta=50]",
        "completed",
        False,
        1,
        False,
        False,
    )
    tasks = outage_tasks()
    await submit_all(cluster, [early])
    await cluster.wait_settled(timeout=60, expected=1)
    upstream = await submit_waiting(cluster, tasks)
    waiting = [upstream[t.task_id] for t in tasks if t.task_id]
    waiting_ids = [t.task_id for t in tasks if t.task_id]
    away = cluster.storage_dir.with_name("images.away")

    async def all_attempted() -> list[dict[str, Any]] | None:
        rows = await cluster.query(
            "SELECT task_id, attempts, error_code, lease_owner FROM images WHERE status = 'pending'"
        )
        attempted = [
            {"id": r[0], "attempts": r[1], "error_code": r[2], "leased": r[3] is not None}
            for r in rows
            if r[0] in waiting_ids and r[1] >= 1
        ]
        return attempted if len(attempted) == len(waiting_ids) else None

    os.rename(cluster.storage_dir, away)
    cluster.storage_dir.write_text("the storage volume is gone\n")
    try:
        await finish_all(cluster, waiting)
        during = [await wait_readiness(cluster, i, 503) for i in range(len(cluster.replicas))]
        image = await cluster.client.get(f"/tasks/{early.task_id}/image")
        attempts = await wait_for(all_attempted, timeout=90, interval=0.5, what="download tries")
        await asyncio.sleep(3)  # a few more rounds of the download loop against the outage
    finally:
        cluster.storage_dir.unlink()
        os.rename(away, cluster.storage_dir)
    crashed = len(cluster.service_logs("download_crashed"))
    after = [await wait_readiness(cluster, i, 200) for i in range(len(cluster.replicas))]
    await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=len(tasks) + 1)
    everything = [*tasks, early]
    verdict = await verify(cluster, everything, refetch_allowed=set(waiting_ids))
    figures.record(
        "storage_outage",
        tasks=verdict.tasks,
        image_gets_per_completed_task=dict(verdict.image_gets),
        stored_image_answer_during_outage=image.status_code,
        downloads_crashed_during_outage=crashed,
        tasks_lost=len(verdict.lost),
        images_stored=verdict.images_stored,
        images_stored_twice=len(verdict.stored_twice),
        problems=verdict.problems,
    )
    return StorageOutage(cluster, during, after, image.status_code, attempts, crashed, verdict)


async def test_storage_down_makes_readyz_not_ready(storage_outage: StorageOutage) -> None:
    """While the storage directory is gone, /readyz says not ready on both, naming storage."""
    for body in storage_outage.readyz_during:
        assert body["status"] == "not_ready"
        assert body["checks"]["storage"].startswith("unavailable")
        assert body["checks"]["database"] == "ok"
    assert all(body["status"] == "ready" for body in storage_outage.readyz_after)


async def test_storage_down_stored_image_answers_503(storage_outage: StorageOutage) -> None:
    """A stored image asked for while the storage is unavailable gets a clear 503, not a 500."""
    assert storage_outage.stored_image_during == 503


async def test_storage_outage_loses_nothing_and_stores_each_image_once(
    storage_outage: StorageOutage,
) -> None:
    """Downloads tried during the outage finish afterwards: one intact object each, no temp file."""
    verdict = storage_outage.verdict
    assert verdict.lost == []
    assert verdict.problems == []
    assert verdict.stored_twice == []
    assert verdict.wrong_bytes == []
    assert verdict.by_status == {"completed": OUTAGE_TASKS + 1}
    assert verdict.images_stored == OUTAGE_TASKS + 1


async def test_storage_outage_downloads_retry_with_a_recorded_reason(
    storage_outage: StorageOutage,
) -> None:
    """Each download tried during the outage records why it failed and gives its lease back."""
    assert storage_outage.crashed_downloads == 0
    for attempt in storage_outage.attempts_during:
        assert attempt["error_code"] in ("storage", "local_io"), attempt
        assert not attempt["leased"], attempt


# -- a full disk ----------------------------------------------------------------------

DISK_BYTES = 4 * 1024 * 1024
FULL_TASKS = 8
FULL_IMAGE_BYTES = 300_000  # 8 of them fit in the disk once the filler is gone


def mount_tmpfs(path: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes over ``path``; False where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; the bytes written."""
    written = 0
    piece = bytes(64 * 1024)
    with path.open("wb") as out:
        try:
            while True:
                out.write(piece)
                out.flush()
                written += len(piece)
        except OSError:
            pass
    return written


@dataclass
class DiskFull:
    """What the full-disk scenario saw."""

    cluster: Cluster
    attempts_during: list[dict[str, Any]]
    readyz_during: list[int]
    verdict: Verdict


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def disk_full(module_clusters: ClusterPool, figures: Figures) -> DiskFull:
    """Storage on a small tmpfs filled up while images arrive; then room is made."""
    cluster = await module_clusters.start("postgres", replicas=2)
    if not mount_tmpfs(cluster.storage_dir, DISK_BYTES):
        pytest.skip("needs root and permission to mount a tmpfs")
    filler = cluster.storage_dir / "filler.bin"
    try:
        fill(filler)
        tasks = [
            Planned(
                n,
                f"full disk task {n} [sim:eta=50,image_size={FULL_IMAGE_BYTES}]",
                "completed",
                False,
                1,
                False,
                False,
                image_size=FULL_IMAGE_BYTES,
            )
            for n in range(FULL_TASKS)
        ]
        await submit_all(cluster, tasks)

        async def all_failed_once() -> list[dict[str, Any]] | None:
            rows = await cluster.query(
                "SELECT task_id, attempts, error_code, lease_owner FROM images "
                "WHERE status = 'pending' AND error_code IS NOT NULL"
            )
            attempts = [
                {"id": r[0], "attempts": r[1], "error_code": r[2], "leased": r[3] is not None}
                for r in rows
            ]
            return attempts if len(attempts) == FULL_TASKS else None

        attempts = await wait_for(all_failed_once, timeout=90, interval=0.5, what="failed tries")
        readyz = [(await readiness(cluster, i))[0] for i in range(len(cluster.replicas))]
        filler.unlink()
        await cluster.wait_settled(timeout=SETTLE_TIMEOUT, expected=FULL_TASKS)
        all_ids = {t.task_id for t in tasks if t.task_id}
        verdict = await verify(cluster, tasks, refetch_allowed=all_ids)
    finally:
        filler.unlink(missing_ok=True)
        subprocess.run(["umount", "-l", str(cluster.storage_dir)], check=False, timeout=30)
    figures.record(
        "disk_full",
        tasks=verdict.tasks,
        error_codes_while_full=sorted({a["error_code"] for a in attempts}),
        readyz_while_full=readyz,
        image_gets_per_completed_task=dict(verdict.image_gets),
        images_stored=verdict.images_stored,
        tasks_lost=len(verdict.lost),
        problems=verdict.problems,
    )
    return DiskFull(cluster, attempts, readyz, verdict)


async def test_full_disk_downloads_retry_with_a_recorded_reason(disk_full: DiskFull) -> None:
    """A download that cannot be written retries later: reason recorded, lease given back."""
    for attempt in disk_full.attempts_during:
        assert attempt["error_code"] in ("storage", "local_io"), attempt
        assert not attempt["leased"], attempt


async def test_full_disk_loses_nothing_once_room_is_made(disk_full: DiskFull) -> None:
    """Every image is stored once, intact, once there is room; no partial file is left."""
    verdict = disk_full.verdict
    assert verdict.lost == []
    assert verdict.problems == []
    assert verdict.stored_twice == []
    assert verdict.wrong_bytes == []
    assert verdict.images_stored == FULL_TASKS
