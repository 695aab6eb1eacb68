"""2. Downloads: the worker's throughput against curl on the same URL, and its
peak memory growth, for 20 MB and 50 MB images from a local server.

Like for like: the baseline is `curl -o FILE` followed by `sha256sum FILE` on the
disk the worker stores to (the worker fetches, hashes, writes, fsyncs and
records). Also over a link paced to 50 MB/s, closer to a real network.
"""

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
# (label, file, link rate in bytes/s; 0 is loopback at full speed)
CASES = (("20MB", "20MB", 0.0), ("50MB", "50MB", 0.0), ("50MB at 50 MB/s", "50MB", 50e6))
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


def curl_seconds(url: str, dest: Path) -> float:
    """Wall time of `curl -o FILE` then `sha256sum FILE` (the file is removed after)."""
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-o", str(dest), url], check=True)
    subprocess.run(["sha256sum", str(dest)], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


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


def _fileserver(workdir: Path, name: str, rate: float) -> tuple[Child, str]:
    port = free_port()
    args = [PYTHON, "-m", "bench.fileserver", "--port", str(port), "--root", str(workdir / "files")]
    server = Child(name, [*args, "--rate", str(rate)], clean_env({}), workdir).start()
    base = f"http://127.0.0.1:{port}"
    server.wait_http(f"{base}/warmup.png")
    return server, base


def measure(workdir: Path, database_url: str, repeats: int = 3) -> dict[str, Any]:
    """Interleaved curl / worker runs per case; medians, ratios and peak RSS growth."""
    files = make_images(workdir / "files")
    curl_file = workdir / "stored" / "curl.png"  # the disk the worker stores to
    curl_file.parent.mkdir(parents=True, exist_ok=True)
    servers: dict[float, tuple[Child, str]] = {}
    worker: Worker | None = None
    results: dict[str, Any] = {}
    try:
        for _, _, rate in CASES:
            if rate not in servers:
                servers[rate] = _fileserver(workdir, f"fileserver-{rate:.0f}", rate)
        base = servers[0.0][1]
        worker = _start_worker(workdir, database_url)
        worker.job(f"{base}/warmup.png")
        curl_seconds(f"{base}/warmup.png", curl_file)
        for label, name, rate in CASES:
            size = SIZES[name]
            url = f"{servers[rate][1]}/{files[name].name}"
            curls, jobs = [], []
            for _ in range(repeats):
                curls.append(curl_seconds(url, curl_file))
                jobs.append(worker.job(url))
            bad = [job for job in jobs if job["image_status"] != "stored"]
            if bad:
                raise RuntimeError(f"download of {label} failed: {bad[0]}")
            curl_s = statistics.median(curls)
            # The job as the goal counts it: fetch, hash, write, fsync, record; the
            # variants rendered after the record are reported beside it.
            job_s = statistics.median(job["seconds"] - job["variants_seconds"] for job in jobs)
            variants_s = statistics.median(job["variants_seconds"] for job in jobs)
            fetch_s = statistics.median(job["fetch_seconds"] for job in jobs)
            growth = max(job["peak_growth_kib"] for job in jobs) / 1024
            results[label] = {
                "bytes": size,
                "link_bytes_per_s": rate or None,
                "curl_mb_s": round(size / curl_s / 1e6, 1),
                "worker_mb_s": round(size / job_s / 1e6, 1),
                "fetch_only_mb_s": round(size / fetch_s / 1e6, 1),
                "variants_ms": round(variants_s * 1000, 1),
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
        for server, _ in servers.values():
            server.stop()
    return {"repeats": repeats, "baseline": "curl -o FILE && sha256sum FILE", "sizes": results}


def migrate_sqlite(path: Path) -> str:
    """The worker's own small SQLite database (the download path does two short updates)."""
    from app.cli import run_migrations

    url = f"sqlite+aiosqlite:///{path}"
    in_thread(run_migrations, url)
    return url
