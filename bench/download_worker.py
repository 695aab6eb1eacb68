"""The worker side of the download benchmark, as its own process.

The real `Downloader` (SafeFetcher, local storage, the task row updates) runs
one job per "go <url>" line on stdin and answers one JSON line: seconds for
the whole job and for the fetch alone, and the peak RSS growth during it
(VmHWM reset through /proc/self/clear_refs before each job, VmRSS as the base).
`python -m bench.download_worker DATABASE_URL STORAGE_DIR`
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog

from app import variants as app_variants
from app.db import create_engine, create_session_factory
from app.fetch import SafeFetcher
from app.models import Image, Task, utcnow
from app.repository import DownloadJob
from app.services.downloads import Downloader
from app.storage.local import LocalStorage
from app.upstream import StarMagicClient
from bench.ids import task_id_at

OWNER = "bench-worker"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


async def _job(downloader: Downloader, engine: Any, url: str) -> dict[str, Any]:
    now = utcnow()
    task = Task(
        id=task_id_at(now),
        status="completed",
        progress=100,
        prompt="bench",
        model="gpt-image-1.5",
        owner="bench",
        upstream_task_id=None,
        created_at=now,
        updated_at=now,
        completed_at=now,
        image_status="pending",
    )
    image = Image(
        task_id=task.id,
        position=0,
        status="pending",
        source_url=url,
        source_expires_at=now + timedelta(hours=24),
        attempts=1,
        next_attempt_at=now,
        lease_owner=f"{OWNER}/0/job",
        lease_until=now + timedelta(minutes=5),
        created_at=now,
        updated_at=now,
    )
    sessions = create_session_factory(engine)
    async with sessions() as session, session.begin():
        session.add(task)
        await session.flush()
        session.add(image)
    job = DownloadJob(
        task_id=task.id,
        position=0,
        lease_owner=f"{OWNER}/0/job",
        source_url=url,
        source_expires_at=image.source_expires_at,
        renewed=False,
        attempts=1,
        upstream_task_id=None,
        task_created_at=now,
        completed_at=now,
    )
    fetch = downloader._fetcher.fetch_to_file
    fetch_seconds = 0.0

    async def timed_fetch(*args: Any, **kwargs: Any) -> Any:
        nonlocal fetch_seconds
        started = time.perf_counter()
        try:
            return await fetch(*args, **kwargs)
        finally:
            fetch_seconds = time.perf_counter() - started

    downloader._fetcher.fetch_to_file = timed_fetch  # type: ignore[method-assign]
    # The variants come after the record, outside the job's lease: timed apart.
    make_variants = app_variants.make_variants_quietly
    variants_seconds = 0.0

    async def timed_variants(*args: Any, **kwargs: Any) -> bool:
        nonlocal variants_seconds
        started = time.perf_counter()
        try:
            made: bool = await make_variants(*args, **kwargs)
            return made
        finally:
            variants_seconds = time.perf_counter() - started

    app_variants.make_variants_quietly = timed_variants
    _reset_peak()
    base = _status_kib("VmRSS")
    started = time.perf_counter()
    await downloader.run(job)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    downloader._fetcher.fetch_to_file = fetch  # type: ignore[method-assign]
    app_variants.make_variants_quietly = make_variants
    async with sessions() as session:
        stored = await session.get(Image, (task.id, 0))
    assert stored is not None
    return {
        "seconds": seconds,
        "fetch_seconds": fetch_seconds,
        "variants_seconds": variants_seconds,
        "rss_base_kib": base,
        "peak_growth_kib": peak - base,
        "image_status": stored.status,
        "size_bytes": stored.size_bytes,
        "error": stored.error_code,
    }


async def main(database_url: str, storage_dir: Path) -> None:
    # The service's log lines go to stderr; stdout carries only the results.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    engine = create_engine(database_url)
    fetcher = SafeFetcher(allow_private=True, max_bytes=50 * 1024 * 1024)
    storage = LocalStorage(storage_dir)
    async with httpx.AsyncClient() as http:
        starmagic = StarMagicClient(http, base_url="http://127.0.0.1:9", api_key="unused")
        downloader = Downloader(engine, fetcher, storage, starmagic, OWNER)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command, _, url = line.strip().partition(" ")
            if command != "go":
                break
            print(json.dumps(await _job(downloader, engine, url)), flush=True)
    await fetcher.aclose()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
