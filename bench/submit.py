"""4. Submission overhead: POST /tasks through the service, minus the simulator's
own latency for the same submit call, measured directly in the same run."""

from __future__ import annotations

import time
from typing import Any

import httpx

from app.callback_urls import callback_url
from app.schemas import TaskCreate
from bench.stack import SIM_KEY, WEBHOOK_SECRET, Service
from bench.stats import summarize

REQUEST = {"prompt": "a lighthouse at dawn, watercolor", "size": "1:1", "quality": "medium"}


def measure(
    service: Service, simulator_url: str, database: str, requests: int = 200
) -> dict[str, Any]:
    """Alternate service and direct simulator calls so that drift hits both alike."""
    upstream = TaskCreate.model_validate(REQUEST).upstream_body()
    # The same body the service sends, callback URL included (any of its task ids will do).
    upstream["callback_url"] = callback_url(service.url, "tsk_" + "0" * 26, WEBHOOK_SECRET)
    via_service: list[float] = []
    direct: list[float] = []
    with (
        service.client() as client,
        httpx.Client(
            base_url=simulator_url,
            headers={"Authorization": f"Bearer {SIM_KEY}"},
            timeout=30,
            trust_env=False,
        ) as provider,
    ):
        for index in range(requests + 10):
            started = time.perf_counter()
            response = client.post("/tasks", json=REQUEST)
            service_s = time.perf_counter() - started
            if response.status_code != 202:
                raise RuntimeError(f"POST /tasks answered {response.status_code}: {response.text}")
            started = time.perf_counter()
            response = provider.post("/v1/images/generations", json=upstream)
            direct_s = time.perf_counter() - started
            response.raise_for_status()
            if index >= 10:  # the first few warm connections and caches
                via_service.append(service_s)
                direct.append(direct_s)
    service_summary = summarize(via_service)
    direct_summary = summarize(direct)
    overhead = sorted(s - d for s, d in zip(via_service, direct, strict=True))
    return {
        "database": database,
        "requests": requests,
        "service": service_summary,
        "simulator_direct": direct_summary,
        "overhead_p50_ms": round(service_summary["p50_ms"] - direct_summary["p50_ms"], 3),
        "overhead_p99_ms": round(service_summary["p99_ms"] - direct_summary["p99_ms"], 3),
        "paired_overhead": summarize(overhead),
    }
