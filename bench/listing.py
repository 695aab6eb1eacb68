"""3. Listing: GET /tasks over 100,000 tasks, a status filter and a page of 50,
first page and a deep cursor page, next to a no-op GET on the same server;
plus the plan of the very SQL the service runs (EXPLAIN ANALYZE on PostgreSQL),
and the console's overview page over the same tasks."""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import event, text

from app import repository
from app.api.tasks import encode_cursor
from app.db import create_engine
from bench.databases import Database, insert_tasks, task_row
from bench.ids import task_id_at
from bench.launcher import NOOP_PREFIX
from bench.stack import API_TOKEN, Service
from bench.stats import ratio, summarize

TASKS = 100_000
PAGE = 50
DEEP_PAGE = 1000
STATUS = "completed"
# Roughly what a busy service's table looks like: mostly finished work.
STATUS_MIX = {
    "completed": 0.70,
    "failed": 0.08,
    "cancelled": 0.02,
    "processing": 0.08,
    "pending": 0.10,
    "submitting": 0.02,
}


def rows(
    count: int = TASKS, days: int = 90, seed: int = 7
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tasks with mixed statuses, created at random over the last `days` days, and their images."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    statuses = rng.choices(list(STATUS_MIX), weights=list(STATUS_MIX.values()), k=count)
    result = []
    images = []
    for status in statuses:
        created = now - timedelta(seconds=rng.uniform(0, days * 86_400))
        fields: dict[str, Any] = {
            "id": task_id_at(created),
            "status": status,
            "created_at": created,
            "updated_at": created + timedelta(seconds=90),
            "upstream_task_id": f"task-unified-{int(created.timestamp())}-{secrets.token_hex(4)}",
        }
        if status == "completed":
            done = created + timedelta(seconds=90)
            image_status = rng.choices(["stored", "failed", "pending"], [0.96, 0.02, 0.02])[0]
            fields.update(progress=100, completed_at=done, image_status=image_status)
            images.append(
                {
                    "task_id": fields["id"],
                    "position": 0,
                    "status": image_status,
                    "source_url": None,
                    "source_expires_at": done + timedelta(hours=24),
                    "renewed": False,
                    "attempts": 1,
                    "next_attempt_at": None,
                    "lease_owner": None,
                    "lease_until": None,
                    "key": f"{created:%Y/%m/%d}/{fields['id']}.png",
                    "content_type": "image/png",
                    "size_bytes": rng.randint(500_000, 4_000_000),
                    "sha256": secrets.token_hex(32),
                    "width": 1024,
                    "height": 1024,
                    "stored_at": done + timedelta(seconds=3),
                    "error_code": None,
                    "error_message": None,
                    "created_at": done,
                    "updated_at": done,
                }
            )
        elif status in ("failed", "cancelled"):
            fields.update(
                completed_at=created + timedelta(seconds=60),
                error_code="generation_failed" if status == "failed" else "cancelled",
                error_message="StarMagic reported that the task failed",
            )
        else:
            fields.update(next_poll_at=created + timedelta(seconds=120))
        result.append(task_row(**fields))
    return result, images


async def _deep_cursor(url: str) -> str:
    """The cursor the API hands out at the end of page DEEP_PAGE - 1."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT created_at, id FROM tasks WHERE status = :status "
                        "ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET :offset"
                    ),
                    {"status": STATUS, "offset": PAGE * (DEEP_PAGE - 1) - 1},
                )
            ).one()
    finally:
        await engine.dispose()
    created = row[0] if isinstance(row[0], datetime) else datetime.fromisoformat(row[0])
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created
    return encode_cursor(created, row[1])


def seed(database: Database) -> dict[str, Any]:
    """Insert the tasks; the counts and the seconds taken."""
    started = time.perf_counter()
    data, images = rows()
    asyncio.run(insert_tasks(database.url, data, images))
    counts: dict[str, int] = {}
    for row in data:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {
        "tasks": len(data),
        "by_status": counts,
        "seconds": round(time.perf_counter() - started, 1),
    }


def measure(service: Service, database: Database, requests: int = 300) -> dict[str, Any]:
    """Round-robin over the three requests (drift hits all alike); p50/p99 of each."""
    cursor = asyncio.run(_deep_cursor(database.url))
    targets = {
        "first_page": f"/tasks?status={STATUS}&limit={PAGE}",
        "deep_page": f"/tasks?status={STATUS}&limit={PAGE}&cursor={cursor}",
        "baseline": NOOP_PREFIX,
    }
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    with service.client() as client:
        for name, path in targets.items():
            response = client.get(path)
            response.raise_for_status()
            if name != "baseline" and len(response.json()["items"]) != PAGE:
                raise RuntimeError(f"{name}: expected a full page of {PAGE}")
        for _ in range(requests):
            for name, path in targets.items():
                started = time.perf_counter()
                response = client.get(path)
                latencies[name].append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"{name} answered {response.status_code}")
    summary = {name: summarize(values) for name, values in latencies.items()}
    base = summary["baseline"]["p50_ms"]
    for name in ("first_page", "deep_page"):
        summary[name]["p50_vs_baseline"] = ratio(summary[name]["p50_ms"], base)
    summary["console_overview"] = _console_overview(service, max(10, requests // 10))
    summary["console_overview"]["p50_vs_baseline"] = ratio(
        summary["console_overview"]["p50_ms"], base
    )
    return {
        "database": database.kind,
        "status_filter": STATUS,
        "page_size": PAGE,
        "deep_page": DEEP_PAGE,
        "requests_each": requests,
        "latency": summary,
        "plans": asyncio.run(_plans(database, cursor)),
    }


def _console_overview(service: Service, requests: int) -> dict[str, Any]:
    """The console's overview page (every figure's query, rendered) over the same tasks."""
    latencies: list[float] = []
    with httpx.Client(base_url=service.url, timeout=30, trust_env=False) as client:
        form = client.get("/console/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        if token is None:
            raise RuntimeError("the console's sign-in form has no anti-forgery token")
        client.post("/console/sign-in", data={"token": API_TOKEN, "csrf_token": token[1]})
        for _ in range(requests + 1):
            started = time.perf_counter()
            response = client.get("/console/overview")
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"console overview answered {response.status_code}")
    return summarize(latencies[1:])  # the first warms the templates


async def _plans(database: Database, cursor: str) -> dict[str, str]:
    """Capture the SQL repository.list_tasks sends, then ask the database how it runs it."""
    from app.api.tasks import decode_cursor

    engine = create_engine(database.url)
    captured: list[tuple[str, Any]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _capture(conn: Any, cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    plans: dict[str, str] = {}
    try:
        for name, after in (("first_page", None), ("deep_page", decode_cursor(cursor))):
            captured.clear()
            async with engine.connect() as db:
                await repository.list_tasks(
                    db, repository.TaskFilter(status=STATUS), limit=PAGE + 1, after=after
                )
            statement, parameters = next(c for c in captured if "FROM tasks" in c[0])
            prefix = (
                "EXPLAIN (ANALYZE, BUFFERS) "
                if database.kind == "postgres"
                else "EXPLAIN QUERY PLAN "
            )
            async with engine.connect() as connection:
                result = await connection.exec_driver_sql(prefix + statement, parameters)
                lines = [" | ".join(str(v) for v in row) for row in result.all()]
            plans[name] = "\n".join([statement.strip(), "--", *lines])
    finally:
        await engine.dispose()
    return plans
