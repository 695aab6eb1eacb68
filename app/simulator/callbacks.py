"""Callback delivery with the provider's policy.

One delivery is a first attempt plus at most ``len(retry_delays)`` retries,
each ``retry_delays[i]`` seconds after the previous failure (a non-2xx answer,
a timeout of ``callback_timeout`` seconds for the whole exchange, or a
connection error). After the last failure the delivery is lost for good.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from app.simulator.payloads import shape_of, snapshot
from app.simulator.state import CallbackAttempt, SimTask, SimulatorState

HEADERS = {"Content-Type": "application/json", "User-Agent": "StarMagic-Callback/simulator"}


async def _attempt(
    state: SimulatorState, url: str, content: bytes, delivery: int, kind: str, number: int
) -> CallbackAttempt:
    started_at = time.time()
    clock = time.perf_counter()
    status_code: int | None = None
    error: str | None = None
    try:
        # The provider's timeout covers the whole exchange, not each socket read.
        async with asyncio.timeout(state.config.callback_timeout):
            response = await state.client.post(url, content=content, headers=HEADERS)
        status_code = response.status_code
    except (httpx.HTTPError, TimeoutError) as exc:
        error = type(exc).__name__
    return CallbackAttempt(
        delivery=delivery,
        kind=kind,
        attempt=number,
        url=url,
        started_at=started_at,
        status_code=status_code,
        error=error,
        latency_ms=round((time.perf_counter() - clock) * 1000, 3),
    )


async def deliver(
    state: SimulatorState,
    task: SimTask,
    body: dict[str, Any],
    *,
    kind: str,
    url: str | None = None,
    retry: bool = True,
) -> list[CallbackAttempt]:
    """POST ``body`` to the task's callback URL (or ``url``), retrying per policy."""
    target = url or task.submission.callback_url
    if target is None:
        return []
    task.deliveries += 1
    delivery = task.deliveries
    content = json.dumps(body, separators=(",", ":")).encode()
    delays = state.config.retry_delays if retry else ()
    attempts: list[CallbackAttempt] = []
    for number in range(1, len(delays) + 2):
        attempt = await _attempt(state, target, content, delivery, kind, number)
        attempts.append(attempt)
        task.attempts.append(attempt)
        state.counters["callback_attempts"] += 1
        if attempt.ok or number > len(delays):
            break
        await asyncio.sleep(delays[number - 1])
    return attempts


async def send_terminal(state: SimulatorState, task: SimTask) -> None:
    """Deliver the terminal snapshot as the faults say: dup, concurrent_dup, late_processing."""
    faults = task.faults
    shape = shape_of(state, task)
    # Built once: every retry and duplicate carries the same bytes, as a real sender would.
    body = snapshot(task, shape)
    for _ in range(faults.dup):
        await asyncio.gather(
            *(deliver(state, task, body, kind="terminal") for _ in range(faults.concurrent_dup))
        )
    if faults.late_processing:
        stale = snapshot(task, shape, status="processing")
        await deliver(state, task, stale, kind="late_processing")
