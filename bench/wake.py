"""6. Time to the stored image: a completion wakes the download worker at once.

The API runs with RUN_BACKGROUND=false and `imagetasks worker` beside it, so the
wake-up crosses processes (PostgreSQL LISTEN/NOTIFY; the worker's own poll is
a second). Callbacks with CONFIRM_CALLBACKS=false complete tasks at a modest
rate; each task's image is a 1 MB PNG on the benchmark's file server. The
figure is `images.stored_at` minus `tasks.completed_at`: wake-up, claim, fetch,
hash, write, fsync and record.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.db import create_engine
from app.repository import IMAGES, TASKS
from bench import downloads, ingest, loadgen
from bench.databases import Database
from bench.procs import PYTHON, Child, clean_env
from bench.saturate import read_entries
from bench.stack import start_service, start_worker
from bench.stats import summarize
from tests.ports import free_port

IMAGE_BYTES = 1_000_000
RATE = 5.0  # completions per second: far below saturation, so only the wake-up shows
DRAIN_SECONDS = 30.0


async def _stored(url: str) -> tuple[list[float], int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(TASKS.c.completed_at, IMAGES.c.stored_at).join(
                        IMAGES, IMAGES.c.task_id == TASKS.c.id
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    done = [(stored - completed).total_seconds() for completed, stored in rows if stored]
    return done, sum(1 for _, stored in rows if stored is None)


async def _pending(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            statement = select(func.count()).where(IMAGES.c.status == "pending")
            return int((await connection.execute(statement)).scalar_one())
    finally:
        await engine.dispose()


def measure(
    database: Database, simulator_url: str, workdir: Path, seconds: float
) -> dict[str, Any]:
    """Completions at RATE for `seconds`; completion → stored latency per image."""
    files = workdir / "wake-files"
    files.mkdir(parents=True, exist_ok=True)
    asyncio.run(downloads._write_png(files / "1MB.png", IMAGE_BYTES))
    port = free_port()
    args = [PYTHON, "-m", "bench.fileserver", "--port", str(port), "--root", str(files)]
    server = Child("wake-fileserver", args, clean_env({}), workdir).start()
    image_url = f"http://127.0.0.1:{port}/1MB.png"
    server.wait_http(image_url)
    count = int(RATE * seconds) + 10
    pool = ingest.CallbackPool(count, simulator_url, image_url=image_url)
    ingest.seed(database, pool)
    service = start_service(
        workdir, f"wake-{database.kind}", database.url, simulator_url, confirm_callbacks=False
    )
    worker = start_worker(service, f"wake-{database.kind}-worker")
    try:
        time.sleep(2.0)  # the worker is listening
        lines = pool.take(count * 2)
        datafile = workdir / f"wake-{database.kind}.tsv"
        datafile.write_text("\n".join(lines) + "\n")
        requests = read_entries(datafile, None)
        # Each task's first delivery completes it; its duplicate follows DUPLICATE_LAG later.
        result = loadgen.open_loop(service.port, requests, rate=RATE * 2, duration=seconds)
        deadline = time.monotonic() + DRAIN_SECONDS
        while asyncio.run(_pending(database.url)) and time.monotonic() < deadline:
            time.sleep(0.5)
        done, missing = asyncio.run(_stored(database.url))
    finally:
        worker.stop()
        service.child.stop()
        server.stop()
    return {
        "database": database.kind,
        "deployment": ingest.SPLIT,
        "image_bytes": IMAGE_BYTES,
        "completions_per_s": RATE,
        "non_2xx": result.non_2xx,
        "completion_to_stored": summarize(done),
        "not_stored": missing,
    }
