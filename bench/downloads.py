"""2. Downloads: the worker's throughput against curl on the same URL, and its
peak memory growth, for 20 MB and 50 MB images from a local server."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from app.simulator.images import padded_png, render_png
from bench.procs import PYTHON, Child, clean_env
from bench.stats import ratio
from tests.ports import free_port
from tests.postgres import in_thread

SIZES = {"20MB": 20_000_000, "50MB": 50_000_000}
WARMUP_BYTES = 1_000_000


async def _write_png(path: Path, size: int) -> None:
    with path.open("wb") as out:
        async for piece in padded_png(render_png(path.name, 512, 512), size):
            out.write(piece)


def make_images(root: Path) -> dict[str, Path]:
    """Valid PNGs of exactly the benchmark sizes (a real image plus padding chunks)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"warmup": root / "warmup.png"}
    files.update({name: root / f"{name}.png" for name in SIZES})
    sizes = {"warmup": WARMUP_BYTES, **SIZES}
    for name, path in files.items():
        asyncio.run(_write_png(path, sizes[name]))
    return files


def curl_seconds(url: str) -> float:
    """Wall time of `curl -o /dev/null` for one URL (curl's own total time)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0])


def curl_version() -> str | None:
    curl = shutil.which("curl")
    if curl is None:
        return None
    return subprocess.run([curl, "--version"], capture_output=True, text=True).stdout.split("\n")[0]


class Worker:
    """bench.download_worker: jobs on request, one JSON line back each."""

    def __init__(self, child: Child) -> None:
        self.child = child

    def job(self, url: str) -> dict[str, Any]:
        popen = self.child.popen
        assert popen is not None
        assert popen.stdin is not None
        assert popen.stdout is not None
        popen.stdin.write(f"go {url}\n".encode())
        popen.stdin.flush()
        result: dict[str, Any] = json.loads(popen.stdout.readline())
        return result


def _start_worker(workdir: Path, database_url: str) -> Worker:
    child = Child(
        "download-worker",
        [PYTHON, "-m", "bench.download_worker", database_url, str(workdir / "stored")],
        clean_env({}),
        workdir,
    )
    child.popen = subprocess.Popen(
        child.args,
        cwd=workdir,
        env=child.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=child.log_path.open("ab"),
    )
    assert child.popen.stdout is not None
    json.loads(child.popen.stdout.readline())  # {"ready": true}
    return Worker(child)


def measure(workdir: Path, database_url: str, repeats: int = 3) -> dict[str, Any]:
    """Interleaved curl / worker runs per size; medians, ratios and peak RSS growth."""
    files = make_images(workdir / "files")
    port = free_port()
    server = Child(
        "fileserver",
        [PYTHON, "-m", "bench.fileserver", "--port", str(port), "--root", str(workdir / "files")],
        clean_env({}),
        workdir,
    ).start()
    base = f"http://127.0.0.1:{port}"
    worker: Worker | None = None
    results: dict[str, Any] = {}
    try:
        server.wait_http(f"{base}/warmup.png")
        worker = _start_worker(workdir, database_url)
        worker.job(f"{base}/warmup.png")
        curl_seconds(f"{base}/warmup.png")
        for name, size in SIZES.items():
            url = f"{base}/{files[name].name}"
            curls, jobs = [], []
            for _ in range(repeats):
                curls.append(curl_seconds(url))
                jobs.append(worker.job(url))
            bad = [job for job in jobs if job["image_status"] != "stored"]
            if bad:
                raise RuntimeError(f"download of {name} failed: {bad[0]}")
            curl_s = statistics.median(curls)
            job_s = statistics.median(job["seconds"] for job in jobs)
            fetch_s = statistics.median(job["fetch_seconds"] for job in jobs)
            growth = max(job["peak_growth_kib"] for job in jobs) / 1024
            results[name] = {
                "bytes": size,
                "curl_mb_s": round(size / curl_s / 1e6, 1),
                "worker_mb_s": round(size / job_s / 1e6, 1),
                "fetch_only_mb_s": round(size / fetch_s / 1e6, 1),
                "ratio": ratio(curl_s, job_s),
                "fetch_only_ratio": ratio(curl_s, fetch_s),
                "peak_rss_growth_mb": round(growth, 1),
                "rss_base_mb": round(jobs[0]["rss_base_kib"] / 1024, 1),
                "runs": {"curl_s": curls, "worker": jobs},
            }
    finally:
        if worker is not None:
            assert worker.child.popen is not None
            assert worker.child.popen.stdin is not None
            worker.child.popen.stdin.close()
            worker.child.stop()
        server.stop()
    return {"repeats": repeats, "sizes": results, "generated_at": time.time()}


def migrate_sqlite(path: Path) -> str:
    """The worker's own small SQLite database (the download path does two short updates)."""
    from app.cli import run_migrations

    url = f"sqlite+aiosqlite:///{path}"
    in_thread(run_migrations, url)
    return url
