"""Webhook fan-out, and callback ingest with a subscriber.

Fan-out: events already waiting in the outbox (queued by failed callbacks to a
process running no loops) are delivered by a fresh process to a local receiver
that only counts (`bench.receiver`); events per second from its first to its last
arrival. The same-run baseline is the receiver's own rate from a plain httpx
client loop with as many requests in flight as the service's WEBHOOK_CONCURRENCY.

Ingest with a subscriber: the ingest benchmark's saturated callback rate with one
webhook endpoint subscribed to every task event (each callback also queues its
delivery), as a ratio to the rate without subscribers on the same process, the
endpoint switched off and on between alternating runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from app.db import create_engine
from app.services.events import TASK_EVENTS
from bench import ingest
from bench.databases import Database
from bench.procs import PYTHON, Child, clean_env
from bench.settling import add_endpoint, seed_processing, send_failed
from bench.stack import start_service
from bench.stats import ratio
from tests.ports import free_port

CONCURRENCY = 8  # WEBHOOK_CONCURRENCY, the service's default
SENDERS = 16  # callbacks in flight while filling the outbox
# About the size of a task.failed delivery, so the baseline sends the same bytes.
BASELINE_BODY = b'{"type":"task.failed","data":{' + b'"x":"' + b"y" * 900 + b'"}}'


def start_receiver(workdir: Path) -> tuple[Child, str]:
    """The counting receiver; its base URL."""
    port = free_port()
    args = [PYTHON, "-m", "bench.receiver", "--port", str(port)]
    child = Child("receiver", args, clean_env({}), workdir).start()
    url = f"http://127.0.0.1:{port}"
    child.wait_http(f"{url}/_count")
    return child, url


def _count(url: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/_count", timeout=10, trust_env=False).json()
    return answer


def _reset(url: str) -> None:
    httpx.post(f"{url}/_reset", timeout=10, trust_env=False).raise_for_status()


async def _raw_rate(url: str, seconds: float) -> float:
    """Requests per second the receiver answers from CONCURRENCY plain client loops."""
    headers = {"content-type": "application/json", "webhook-id": "evt_bench"}
    deadline = time.perf_counter() + seconds
    sent = 0

    async def loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            response = await client.post("/hook", content=BASELINE_BODY, headers=headers)
            response.raise_for_status()
            sent += 1

    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
        started = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(CONCURRENCY)))
        return sent / (time.perf_counter() - started)


async def _fill(service_url: str, tasks: list[tuple[str, str]]) -> None:
    queue = list(tasks)

    async def sender(client: httpx.AsyncClient) -> None:
        while queue:
            await send_failed(client, *queue.pop())

    async with httpx.AsyncClient(base_url=service_url, timeout=30, trust_env=False) as client:
        await asyncio.gather(*(sender(client) for _ in range(SENDERS)))


def measure(
    database: Database, simulator_url: str, workdir: Path, events: int, baseline_seconds: float
) -> dict[str, Any]:
    """Events delivered per second by one process, against the receiver's raw rate."""
    receiver, receiver_url = start_receiver(workdir)
    settings: dict[str, Any] = {
        "confirm_callbacks": False,
        "webhook_allowed_networks": "127.0.0.0/8",
        "webhook_concurrency": CONCURRENCY,
    }
    label = f"fanout-{database.kind}"
    try:
        asyncio.run(_raw_rate(receiver_url, 1.0))  # warm-up
        raw = asyncio.run(_raw_rate(receiver_url, baseline_seconds))
        _reset(receiver_url)
        tasks = seed_processing(database.url, events)
        add_endpoint(database.url, f"{receiver_url}/hook", ["task.failed"])
        filler = start_service(workdir, f"{label}-fill", database.url, simulator_url, **settings)
        try:
            asyncio.run(_fill(filler.url, tasks))
        finally:
            filler.child.stop()
        deliverer = start_service(
            workdir,
            f"{label}-deliver",
            database.url,
            simulator_url,
            run_background=True,
            **settings,
        )
        try:
            deadline = time.monotonic() + 300
            while (seen := _count(receiver_url))["count"] < events:
                deliverer.child.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fan-out: {seen['count']} of {events} delivered")
                time.sleep(0.2)
        finally:
            deliverer.child.stop()
    finally:
        receiver.stop()
    span = (seen["last"] or 0) - (seen["first"] or 0)
    rate = (seen["count"] - 1) / span if span > 0 else None
    return {
        "database": database.kind,
        "events": events,
        "delivered": seen["count"],
        "concurrency": CONCURRENCY,
        "delivered_per_s": round(rate, 1) if rate else None,
        "receiver_raw_rps": round(raw, 1),
        "ratio": ratio(rate, raw),
    }


def _sql(url: str, statement: str, **params: Any) -> int:
    """Run one statement; its first column of the first row, or the rows it changed."""

    async def execute() -> int:
        engine = create_engine(url)
        try:
            async with engine.begin() as db:
                result = await db.execute(text(statement), params)
                return int(result.scalar_one()) if result.returns_rows else result.rowcount
        finally:
            await engine.dispose()

    return asyncio.run(execute())


def _enable(url: str, endpoint_id: str, enabled: bool) -> None:
    _sql(
        url, "UPDATE webhook_endpoints SET enabled = :on WHERE id = :id", on=enabled, id=endpoint_id
    )


def measure_ingest(
    database: Database, simulator_url: str, workdir: Path, seconds: float, pairs: int, pool: int
) -> dict[str, Any]:
    """Saturated ingest on one process, with the endpoint off and on in turns (ABBA)."""
    callbacks = ingest.CallbackPool(pool, simulator_url)
    ingest.seed(database, callbacks)
    # The pool's tasks belong to the seeding owner: the endpoint is that owner's. The
    # process runs no loops, so nothing is sent: this is the cost of queueing deliveries.
    endpoint = add_endpoint(database.url, "http://127.0.0.1:9/hook", list(TASK_EVENTS), "bench")
    label = f"subscribed-{database.kind}"
    service = start_service(workdir, label, database.url, simulator_url, confirm_callbacks=False)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    try:
        run = ingest.Runner(service, callbacks, workdir, label)
        baseline = run.saturate("baseline", seconds, 5000)
        _enable(database.url, endpoint, False)
        warm = run.saturate("webhook", 1.0, 2000)
        for pair in range(pairs):
            for subscribed in (False, True) if pair % 2 == 0 else (True, False):
                _enable(database.url, endpoint, subscribed)
                result = run.saturate("webhook", seconds, warm["rps"])
                runs[subscribed].append({k: result[k] for k in ("rps", "non_2xx", "errors")})
    finally:
        service.child.stop()
    plain = sum(r["rps"] for r in runs[False]) / len(runs[False])
    subscribed_rps = sum(r["rps"] for r in runs[True]) / len(runs[True])
    return {
        "database": database.kind,
        "seconds": seconds,
        "pairs": pairs,
        "baseline_rps": baseline["rps"],
        "plain_rps": round(plain, 1),
        "subscribed_rps": round(subscribed_rps, 1),
        "plain_runs": runs[False],
        "subscribed_runs": runs[True],
        "ratio": ratio(subscribed_rps, plain),
        "plain_to_baseline": ratio(plain, baseline["rps"]),
        # Proof the subscribed runs queued deliveries: one per event they made.
        "deliveries_queued": _sql(database.url, "SELECT count(*) FROM webhook_deliveries"),
        "pool_exhausted": callbacks.exhausted,
    }
