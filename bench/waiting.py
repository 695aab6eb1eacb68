"""Wait latency: from a task settling to its `Prefer: wait` waiter being answered.

On PostgreSQL the waiter asks one service process and the failed callback that
settles the task goes to another (the wake-up crosses processes by LISTEN/NOTIFY);
on SQLite one process does both. The same-run baseline is a plain GET of the
task from the waiter's process: what answering costs without waiting.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from bench.databases import Database
from bench.settling import seed_processing, send_failed, settled_at
from bench.stack import API_TOKEN, Service, start_service
from bench.stats import ratio, summarize

WAIT_SECONDS = 30
SUBSCRIBE_SECONDS = 0.05  # the waiter's request reaches its process and subscribes


def _client(service: Service) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=service.url,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=WAIT_SECONDS + 10,
        trust_env=False,
    )


async def _samples(
    settler: Service, waiter: Service, tasks: list[tuple[str, str]]
) -> tuple[dict[str, float], list[float], int]:
    """Each task's answer time at its waiter; plain-read round trips; unsettled answers."""
    answered: dict[str, float] = {}
    reads: list[float] = []
    unsettled = 0
    async with _client(settler) as settling, _client(waiter) as waiting:
        for task_id, upstream in tasks:
            started = time.perf_counter()
            plain = await waiting.get(f"/tasks/{task_id}")
            reads.append(time.perf_counter() - started)
            plain.raise_for_status()
            asked = asyncio.create_task(
                waiting.get(f"/tasks/{task_id}", headers={"Prefer": f"wait={WAIT_SECONDS}"})
            )
            await asyncio.sleep(SUBSCRIBE_SECONDS)
            await send_failed(settling, task_id, upstream)
            response = await asked
            answered[task_id] = time.time()
            response.raise_for_status()
            unsettled += 0 if response.json()["settled"] else 1
    return answered, reads, unsettled


def measure(database: Database, simulator_url: str, workdir: Path, samples: int) -> dict[str, Any]:
    """Wait latency p50/p99 against a plain read's, one waiter at a time."""
    tasks = seed_processing(database.url, samples + 5)
    settings = {"confirm_callbacks": False}
    label = f"waiting-{database.kind}"
    settler = start_service(workdir, f"{label}-settler", database.url, simulator_url, **settings)
    waiter = settler
    try:
        if database.kind == "postgres":
            waiter = start_service(workdir, f"{label}-waiter", database.url, simulator_url)
        # A few unmeasured rounds warm both processes' connections.
        asyncio.run(_samples(settler, waiter, tasks[:5]))
        answered, reads, unsettled = asyncio.run(_samples(settler, waiter, tasks[5:]))
    finally:
        if waiter is not settler:
            waiter.child.stop()
        settler.child.stop()
    settled = settled_at(database.url)
    lags = [answered[task_id] - settled[task_id] for task_id in answered]
    wait = summarize(lags)
    read = summarize(reads)
    return {
        "database": database.kind,
        "processes": 2 if database.kind == "postgres" else 1,
        "samples": len(lags),
        "unsettled_answers": unsettled,
        "wait_latency": wait,
        "plain_read": read,
        "p50_ratio": ratio(wait["p50_ms"], read["p50_ms"]),
        "p99_ratio": ratio(wait["p99_ms"], read["p99_ms"]),
    }
