"""1. Callback ingest: saturated throughput against a no-op baseline on the same
server, latency at half the saturating rate, and a sweep of offered rates.

Callbacks are valid: real tasks seeded in the database, tokens from
`app.callback_urls.sign`, bodies shaped like the provider's terminal callback
(the only kind StarMagic sends). Every task gets two identical deliveries a few
dozen requests apart, so half the traffic is new and half duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import string
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, text

from app.callback_urls import WEBHOOK_PATH, sign
from app.db import create_engine
from app.repository import DELIVERIES, IS_ACTIVE, TASKS
from bench import loadgen
from bench.databases import Database, insert_tasks, task_row
from bench.ids import task_id_at
from bench.launcher import NOOP_PREFIX
from bench.procs import Child
from bench.saturate import read_entries, saturate
from bench.stack import WEBHOOK_SECRET, Service, start_service, start_worker
from bench.stats import ratio, summarize

DUPLICATE_LAG = 64  # requests between a callback and its duplicate
SEED_CHUNK = 5000
# The README's production shape: API replicas with RUN_BACKGROUND=false and
# `imagetasks worker` beside them; and the default, everything in one process.
SPLIT = "api+worker"
SINGLE = "single process"
CONFIRM_DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class IngestPlan:
    """How long each phase runs (seconds); `--quick` shrinks them."""

    warmup: float = 2.0
    saturation: float = 5.0
    pairs: int = 2
    half_rate: float = 30.0
    sweep: float = 4.0
    sweep_fractions: tuple[float, ...] = (0.25, 0.75, 0.9, 1.0)
    pool: int = 80_000


def _upstream_id(created: int) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return f"task-unified-{created}-{''.join(secrets.choice(alphabet) for _ in range(8))}"


class CallbackPool:
    """Seeded tasks, handed out in order so that every run gets fresh ones."""

    def __init__(self, size: int, simulator_url: str, image_url: str | None = None) -> None:
        now = datetime.now(UTC) - timedelta(minutes=5)
        created = int(now.timestamp())
        self.tasks = [(task_id_at(now), _upstream_id(created)) for _ in range(size)]
        self.simulator_url = simulator_url
        self.image_url = image_url  # one image for every task, else the simulator's
        self.links: dict[str, str] = {}  # the simulator's live link of each task's image
        self.created = created
        self.next = 0
        self.exhausted = False

    def rows(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC) - timedelta(minutes=5)
        return [
            task_row(
                id=task_id,
                status="processing",
                progress=50,
                upstream_task_id=upstream,
                created_at=now,
                updated_at=now,
                last_event_at=now,
                next_poll_at=now + timedelta(days=1),
            )
            for task_id, upstream in self.tasks
        ]

    def _line(self, task_id: str, upstream: str) -> str:
        data = {
            "id": upstream,
            "status": "completed",
            "progress": 100,
            "created": self.created,
            "estimated_time": 100,
            "result": {
                "images": [
                    {
                        "url": self.image_url or self.links[upstream],
                        "expires_at": self.created + 86_400,
                    }
                ]
            },
            "completed": self.created + 90,
            "actual_time": 90,
        }
        body = json.dumps({"code": 200, "data": data}, separators=(",", ":"))
        return f"{WEBHOOK_PATH}/{task_id}/{sign(task_id, WEBHOOK_SECRET)}\t{body}"

    def take(self, requests: int) -> list[str]:
        """About `requests` callback lines over fresh tasks: each new one, then its duplicate."""
        count = max(1, -(-requests // 2))
        if self.next + count > len(self.tasks):
            self.exhausted = True
            self.next = 0
        chosen = self.tasks[self.next : self.next + count]
        self.next += count
        lines = [self._line(*task) for task in chosen]
        ordered: list[str] = []
        for k in range(count + DUPLICATE_LAG):
            if k < count:
                ordered.append(lines[k])
            if k >= DUPLICATE_LAG and k - DUPLICATE_LAG < count:
                ordered.append(lines[k - DUPLICATE_LAG])
        return ordered


def seed(database: Database, pool: CallbackPool) -> float:
    """Insert the pool's tasks and register them with the simulator; seconds taken."""
    started = time.perf_counter()
    asyncio.run(insert_tasks(database.url, pool.rows()))
    upstream = [u for _, u in pool.tasks]
    with httpx.Client(timeout=60, trust_env=False) as client:
        for start in range(0, len(upstream), SEED_CHUNK):
            body = {"ids": upstream[start : start + SEED_CHUNK]}
            answer = client.post(f"{pool.simulator_url}/_bench/seed", json=body)
            pool.links.update(answer.raise_for_status().json()["links"])
    return time.perf_counter() - started


_BACKLOG = select(func.count()).where(TASKS.c.confirm_requested_at.is_not(None), IS_ACTIVE)


async def _backlog(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return int((await connection.execute(_BACKLOG)).scalar_one())
    finally:
        await engine.dispose()


class BacklogSampler:
    """Due confirmations, counted once a second from another thread while load runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(asyncio.run(_backlog(self.url)))

    def __enter__(self) -> BacklogSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def _confirmations(url: str, since: datetime) -> tuple[list[float], int]:
    """Seconds from each task's first callback to its confirmed completion; unconfirmed count."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            statement = (
                select(TASKS.c.completed_at, func.min(DELIVERIES.c.received_at))
                .join(TASKS, TASKS.c.id == DELIVERIES.c.task_id)
                .where(DELIVERIES.c.received_at >= since)
                .group_by(TASKS.c.id, TASKS.c.completed_at)
            )
            rows = (await connection.execute(statement)).all()
    finally:
        await engine.dispose()
    done = [(completed - received).total_seconds() for completed, received in rows if completed]
    return done, sum(1 for completed, _ in rows if completed is None)


def confirmation_figures(url: str, since: datetime, samples: list[int]) -> dict[str, Any]:
    """Callback → confirmed latency once the backlog drained, and the backlog over time."""
    deadline = time.monotonic() + CONFIRM_DRAIN_SECONDS
    while asyncio.run(_backlog(url)) and time.monotonic() < deadline:
        time.sleep(0.5)
    done, unconfirmed = asyncio.run(_confirmations(url, since))
    third = max(len(samples) // 3, 1)
    return {
        "callback_to_confirmed": summarize(done),
        "unconfirmed": unconfirmed,
        "backlog_samples": samples,
        "backlog_first_third_mean": round(sum(samples[:third]) / third, 1) if samples else None,
        "backlog_last_third_mean": round(sum(samples[-third:]) / third, 1) if samples else None,
        "backlog_max": max(samples) if samples else None,
    }


async def _outcomes(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT outcome, count(*) FROM callback_deliveries GROUP BY outcome")
            )
            return {str(outcome): int(count) for outcome, count in rows.all()}
    finally:
        await engine.dispose()


def _sim_queries(simulator_url: str) -> int:
    stats = httpx.get(f"{simulator_url}/_sim/stats", timeout=30, trust_env=False).json()
    return int(stats["queries"])


class Runner:
    """Runs the phases against one service process."""

    def __init__(
        self,
        service: Service,
        pool: CallbackPool,
        workdir: Path,
        label: str,
        worker: Child | None = None,
    ) -> None:
        self.service = service
        self.worker = worker
        self.pool = pool
        self.workdir = workdir
        self.label = label
        self.files = 0
        # The baseline ignores what it is sent: one fixed set of request shapes will do,
        # and the pool's fresh tasks are kept for the webhook.
        self.baseline_lines = pool.take(4000)

    def _datafile(self, lines: list[str]) -> Path:
        self.files += 1
        path = self.workdir / f"{self.label}-{self.files}.tsv"
        path.write_text("\n".join(lines) + "\n")
        return path

    def saturate(
        self, endpoint: str, seconds: float, expected_rps: float, *, worker_paused: bool = False
    ) -> dict[str, Any]:
        """One wrk run; the webhook gets fresh tasks, the baseline the same request shapes.

        `worker_paused`: the worker is stopped for the run (and catches up after), as if
        it ran on cores of its own: what the API replica alone reaches."""
        prefix = NOOP_PREFIX if endpoint == "baseline" else None
        if prefix:
            lines = self.baseline_lines
        else:
            lines = self.pool.take(int(expected_rps * seconds * 1.5) + 1000)
        datafile = self._datafile(lines)
        api_before = self.service.child.cpu_seconds()
        worker_before = self.worker.cpu_seconds() if self.worker is not None else 0.0
        with self.worker.paused() if worker_paused and self.worker else contextlib.nullcontext():
            result = saturate(self.service.port, datafile, prefix=prefix, duration=seconds)
        result["endpoint"] = endpoint
        result["idle_wait_s"] = round(self.wait_idle(), 2)
        # CPU per request, work deferred past the run included: the API process alone
        # (what one API replica spends), and the worker beside it.
        requests = max(int(result.get("requests") or 0), 1)
        api = self.service.child.cpu_seconds() - api_before
        result["api_cpu_ms"] = round(api / requests * 1000, 3)
        if self.worker is not None:
            worker = self.worker.cpu_seconds() - worker_before
            result["worker_cpu_ms"] = round(worker / requests * 1000, 3)
        return result

    def wait_idle(self) -> float:
        """Until the service and its worker rest: deferred work stays out of the next run."""
        waited = self.service.child.wait_idle()
        if self.worker is not None:
            waited += self.worker.wait_idle()
        return waited

    def cpu_seconds(self) -> float:
        """The service's CPU time, and its worker's."""
        worker = self.worker.cpu_seconds() if self.worker is not None else 0.0
        return self.service.child.cpu_seconds() + worker

    def open_loop(self, endpoint: str, rate: float, seconds: float) -> dict[str, Any]:
        """Constant offered rate; latency from each request's scheduled time."""
        prefix = NOOP_PREFIX if endpoint == "baseline" else None
        lines = self.baseline_lines if prefix else self.pool.take(int(rate * seconds) + 10)
        requests = read_entries(self._datafile(lines), prefix)
        cpu_before = self.cpu_seconds()
        result = loadgen.open_loop(self.service.port, requests, rate=rate, duration=seconds)
        cpu = self.cpu_seconds() - cpu_before
        idle = self.wait_idle()
        return {
            "endpoint": endpoint,
            "offered_rps": round(rate, 1),
            "achieved_rps": round(result.achieved_rate, 1),
            "non_2xx": result.non_2xx,
            "errors": result.errors + result.unfinished,
            "latency": summarize(result.latencies),
            "service_cpu_cores": round(cpu / seconds, 3),
            "generator_cpu_cores": round(result.generator_cpu_seconds / seconds, 3),
            "idle_wait_s": round(idle, 2),
        }


def measure(
    database: Database,
    pool: CallbackPool,
    simulator_url: str,
    workdir: Path,
    plan: IngestPlan,
    *,
    confirm: bool,
    sweep: bool,
    deployment: str = SPLIT,
) -> dict[str, Any]:
    """Saturation pairs, the half-rate point and (optionally) the sweep on one deployment."""
    label = f"ingest-{database.kind}-{'confirm' if confirm else 'noconfirm'}"
    label += "-single" if deployment == SINGLE else ""
    service = start_service(
        workdir,
        label,
        database.url,
        simulator_url,
        confirm_callbacks=confirm,
        run_background=deployment == SINGLE,
    )
    worker = start_worker(service, label + "-worker") if deployment == SPLIT else None
    queries_before = _sim_queries(simulator_url)
    outcomes_before = asyncio.run(_outcomes(database.url))
    try:
        run = Runner(service, pool, workdir, label, worker)
        warm = run.saturate("baseline", plan.warmup, 5000)
        warm_hook = run.saturate("webhook", plan.warmup, 2000)
        runs = []
        for _ in range(plan.pairs):
            runs.append(run.saturate("baseline", plan.saturation, warm["rps"]))
            runs.append(run.saturate("webhook", plan.saturation, warm_hook["rps"]))
        alone = None
        if worker is not None:
            # The same pair with the worker stopped during the webhook run: the API
            # replica's own figure, without the worker's downloads sharing its cores.
            alone_base = run.saturate("baseline", plan.saturation, warm["rps"])
            alone_hook = run.saturate(
                "webhook", plan.saturation, warm_hook["rps"], worker_paused=True
            )
            alone = {
                "baseline_rps": alone_base["rps"],
                "webhook_rps": alone_hook["rps"],
                "ratio": ratio(alone_hook["rps"], alone_base["rps"]),
            }
        base = [r["rps"] for r in runs if r["endpoint"] == "baseline"]
        hook = [r["rps"] for r in runs if r["endpoint"] == "webhook"]
        base_cpu = [r["api_cpu_ms"] for r in runs if r["endpoint"] == "baseline"]
        hook_cpu = [r["api_cpu_ms"] for r in runs if r["endpoint"] == "webhook"]
        worker_cpu = [r.get("worker_cpu_ms", 0.0) for r in runs if r["endpoint"] == "webhook"]
        saturated = sum(hook) / len(hook)
        half = saturated / 2
        since = datetime.now(UTC)
        with BacklogSampler(database.url) as sampler:
            half_hook = run.open_loop("webhook", half, plan.half_rate)
        confirmation = (
            confirmation_figures(database.url, since, sampler.samples) if confirm else None
        )
        half_base = run.open_loop("baseline", half, plan.half_rate)
        if worker is not None and alone is not None:
            # The API replica alone at half its own saturated rate: the latency a
            # replica gives when the worker runs on other cores.
            alone_half = alone["webhook_rps"] / 2
            with worker.paused():
                alone_point = run.open_loop("webhook", alone_half, plan.half_rate)
            run.wait_idle()  # the worker catches up before the next run
            alone["half_rate"] = {"rate": round(alone_half, 1), "webhook": alone_point}
        points = [{"fraction": 0.5, **half_hook}]
        if sweep:
            for fraction in plan.sweep_fractions:
                point = run.open_loop("webhook", saturated * fraction, plan.sweep)
                points.append({"fraction": fraction, **point})
        points.sort(key=lambda p: p["fraction"])
        outcomes_after = asyncio.run(_outcomes(database.url))
    finally:
        if worker is not None:
            worker.stop()
        service.child.stop()
    outcomes = {k: v - outcomes_before.get(k, 0) for k, v in outcomes_after.items()}
    return {
        "database": database.kind,
        "confirm_callbacks": confirm,
        "deployment": deployment,
        "saturation": {
            "runs": runs,
            "baseline_rps": round(sum(base) / len(base), 1),
            "webhook_rps": round(saturated, 1),
            "ratio": ratio(sum(hook), sum(base)),
            "pair_ratios": [ratio(h, b) for h, b in zip(hook, base, strict=True)],
            "api_cpu_ms": {
                "baseline": round(sum(base_cpu) / len(base_cpu), 3),
                "webhook": round(sum(hook_cpu) / len(hook_cpu), 3),
                "worker_per_webhook": round(sum(worker_cpu) / len(worker_cpu), 3),
            },
            "cpu_ratio": ratio(sum(base_cpu), sum(hook_cpu)),
            "worker_paused": alone,
        },
        "half_rate": {"rate": round(half, 1), "webhook": half_hook, "baseline": half_base},
        "confirmation": confirmation,
        "sweep": points,
        "deliveries_by_outcome": outcomes,
        "confirmation_queries": _sim_queries(simulator_url) - queries_before,
        "pool_exhausted": pool.exhausted,
    }
