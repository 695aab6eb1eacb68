"""The end-to-end harness: the simulator, the service and extra workers as separate
processes on loopback ports, talking real HTTP to each other.

A ``Stack`` owns one simulator, one service and any extra ``imagetasks worker``
processes, all sharing one database and one storage directory. Every process
runs in the stack's own temp directory (so no ``.env`` is picked up), gets its
settings from the environment only, and writes its stdout and stderr to files
there, which tests read back as the service's JSON log lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.callback_urls import WEBHOOK_PATH, sign
from app.config import Settings
from tests.ports import free_port

T = TypeVar("T")

IMAGETASKS = str(Path(sys.executable).with_name("imagetasks"))
API_TOKEN = "e2e-token-" + "c" * 24
WEBHOOK_SECRET = "e2e-webhook-secret-0123456789abcdef"
SIM_KEY = "sim-key"
TIME_SCALE = 0.02  # the simulator's default estimated_time of 100 s takes 2 s
SIM_IMAGE_SIZE = 64  # every image pinned small, whatever size the request implies
# A start is waited for by its own signs (it answers, or it exited: check_alive fails at
# once), so the bound only has to hold a slow one: on a busy 2-core machine a replica
# started again mid-storm spent about 13 s importing before it served, and its first /readyz
# (which reads the migration scripts) took 4 s, over 20 s in all.
START_TIMEOUT = 60.0
# One readiness probe: a slow 200 is still ready (see above), so not cut off at 2 s.
PROBE_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
# Every setting the service reads: cleared from the inherited environment so the
# runner's own shell cannot leak into the processes under test.
_SETTING_NAMES = {name.upper() for name in Settings.model_fields}


async def wait_for(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def env_value(value: str | int | float | bool) -> str:
    """A setting as an environment variable spells it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def sha256(data: bytes) -> str:
    """Hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


class Process:
    """One ``imagetasks`` subcommand as a child process, its output in two files."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.workdir = workdir
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The running child's pid, if any."""
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        """True while the child has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Spawn the child; output is appended, so restarts keep the earlier lines."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.popen = subprocess.Popen(
                [IMAGETASKS, *self.args],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def output(self) -> str:
        """Everything the process wrote so far, stdout then stderr."""
        parts = [p.read_text(errors="replace") for p in (self.stdout_path, self.stderr_path)]
        return "".join(part for part in parts if part)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines it wrote (other lines are skipped)."""
        lines: list[dict[str, Any]] = []
        for raw in self.output().splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    continue
        return lines

    def check_alive(self) -> None:
        """Fail with the process's output when it has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.output()[-3000:]
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class SimControl:
    """The simulator's ``/_sim`` inspection and control routes."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.client.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    async def stats(self) -> dict[str, Any]:
        """Counters: submits, queries, image GETs (per task and per link), callbacks."""
        result: dict[str, Any] = await self._json("GET", "/_sim/stats")
        return result

    async def task(self, upstream_id: str) -> dict[str, Any]:
        """One task: state, faults, links, callback attempts, queries, image GETs."""
        result: dict[str, Any] = await self._json("GET", f"/_sim/tasks/{upstream_id}")
        return result

    async def tasks(self) -> list[dict[str, Any]]:
        """Every task, oldest first."""
        result: list[dict[str, Any]] = await self._json("GET", "/_sim/tasks")
        return result

    async def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the default faults of new submissions (no arguments clears them)."""
        result: dict[str, Any] = await self._json("POST", "/_sim/faults", faults)
        return result

    async def reset(self) -> None:
        """Forget every task, link and counter."""
        await self._json("POST", "/_sim/reset")

    async def complete(self, upstream_id: str, outcome: str = "completed") -> dict[str, Any]:
        """Finish a task now."""
        body = {"outcome": outcome}
        result: dict[str, Any] = await self._json(
            "POST", f"/_sim/tasks/{upstream_id}/complete", body
        )
        return result

    async def callback(self, upstream_id: str, **request: Any) -> dict[str, Any]:
        """Deliver one callback now (see the simulator's ``CallbackRequest``)."""
        result: dict[str, Any] = await self._json(
            "POST", f"/_sim/tasks/{upstream_id}/callback", request
        )
        return result

    async def image_bytes(self, upstream_id: str) -> bytes:
        """The bytes behind the task's newest link (counts as one image GET)."""
        task = await self.task(upstream_id)
        response = await self.client.get(task["links"][-1]["url"])
        response.raise_for_status()
        return response.content


class Stack:
    """A simulator, a service and optional extra workers on one database and storage."""

    def __init__(self, root: Path, database_url: str, **service_env: str | int | float | bool):
        self.root = root
        self.database_url = database_url
        self.storage_dir = root / "images"
        self.simulator_port = free_port()
        self.service_port = free_port()
        self.simulator_url = f"http://127.0.0.1:{self.simulator_port}"
        self.service_url = f"http://127.0.0.1:{self.service_port}"
        self.env = self._environment(service_env)
        self.simulator = Process(
            "simulator",
            [
                "simulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.simulator_port),
                "--time-scale",
                str(TIME_SCALE),
                "--api-key",
                SIM_KEY,
                "--image-size",
                f"{SIM_IMAGE_SIZE}x{SIM_IMAGE_SIZE}",
            ],
            self.env,
            root,
        )
        serve = ["serve", "--host", "127.0.0.1", "--port", str(self.service_port)]
        self.service = Process("service", serve, self.env, root)
        self.workers: list[Process] = []
        self.client = httpx.AsyncClient(
            base_url=self.service_url,
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=15,
            trust_env=False,
        )
        self.sim = SimControl(
            httpx.AsyncClient(base_url=self.simulator_url, timeout=15, trust_env=False)
        )
        self._engine: AsyncEngine | None = None

    def _environment(self, overrides: Mapping[str, str | int | float | bool]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SETTING_NAMES}
        values: dict[str, str | int | float | bool] = {
            "DATABASE_URL": self.database_url,
            "STORAGE_URL": f"file://{self.storage_dir}",
            "STARMAGIC_BASE_URL": self.simulator_url,
            "STARMAGIC_API_KEY": SIM_KEY,
            "PUBLIC_BASE_URL": self.service_url,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "API_TOKENS": API_TOKEN,
            "ALLOW_INSECURE_CALLBACKS": True,
            "DOWNLOAD_ALLOW_PRIVATE_NETWORKS": True,
            "RECONCILE_INTERVAL_SECONDS": 1,
            "RECONCILE_AFTER_SECONDS": 3,
            "CONFIRM_CALLBACKS": True,
            "LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        values.update({name.upper(): value for name, value in overrides.items()})
        env.update({name: env_value(value) for name, value in values.items()})
        return env

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> Stack:
        """Start the simulator, then the service; return once both answer."""
        self.simulator.start()
        await self._wait_http(self.simulator, f"{self.simulator_url}/_sim/stats")
        await self.start_service()
        return self

    async def start_service(self) -> None:
        """Start the service process and wait for ``/readyz``."""
        self.service.start()
        await self._wait_http(self.service, f"{self.service_url}/readyz")

    async def stop_service(self) -> int | None:
        """Stop the service gracefully (SIGTERM, SIGKILL after a while); its exit code."""
        return await asyncio.to_thread(self.service.stop)

    async def restart_service(self) -> None:
        """Stop the service gracefully (SIGTERM) and start it again on the same port."""
        await self.stop_service()
        await self.start_service()

    def kill_service(self) -> None:
        """SIGKILL the service: no lease is given back, no temp file cleaned."""
        self.service.kill()

    async def start_extra_worker(self, **env: str | int | float | bool) -> Process:
        """One more ``imagetasks worker`` on the same database and storage."""
        worker_env = {**self.env, **{k.upper(): env_value(v) for k, v in env.items()}}
        worker = Process(f"worker{len(self.workers) + 1}", ["worker"], worker_env, self.root)
        self.workers.append(worker)
        worker.start()
        await wait_for(
            lambda: self._worker_started(worker), timeout=START_TIMEOUT, what=f"{worker.name}"
        )
        return worker

    async def start_extra_service(self, **env: str | int | float | bool) -> str:
        """One more ``imagetasks serve`` on the same database and storage; its base URL."""
        port = free_port()
        service_env = {**self.env, **{k.upper(): env_value(v) for k, v in env.items()}}
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        service = Process(f"service{len(self.workers) + 2}", serve, service_env, self.root)
        self.workers.append(service)
        service.start()
        url = f"http://127.0.0.1:{port}"
        await self._wait_http(service, f"{url}/readyz")
        return url

    async def _worker_started(self, worker: Process) -> bool:
        worker.check_alive()
        return any(line.get("event") == "worker_started" for line in worker.log_lines())

    async def _wait_http(self, process: Process, url: str) -> None:
        async def ready() -> bool:
            process.check_alive()
            try:
                response = await self.client.get(url, timeout=PROBE_TIMEOUT)
            except httpx.TransportError:
                return False
            return response.status_code == 200

        await wait_for(ready, timeout=START_TIMEOUT, interval=0.05, what=f"{process.name} at {url}")

    async def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and close the clients."""
        for process in [*self.workers, self.service, self.simulator]:
            await asyncio.to_thread(process.stop)
        await self.client.aclose()
        await self.sim.client.aclose()
        if self._engine is not None:
            await self._engine.dispose()

    # -- the service's API -----------------------------------------------------------

    async def submit(self, prompt: str, **fields: Any) -> dict[str, Any]:
        """POST /tasks; the accepted task."""
        response = await self.client.post("/tasks", json={"prompt": prompt, **fields})
        assert response.status_code == 202, response.text
        task: dict[str, Any] = response.json()
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        """GET /tasks/{id}."""
        response = await self.client.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    async def wait_task(
        self,
        task_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 30.0,
        what: str = "the task",
    ) -> dict[str, Any]:
        """Poll GET /tasks/{id} until ``predicate`` holds; the task then."""

        async def probe() -> dict[str, Any] | None:
            self.service.check_alive()
            task = await self.task(task_id)
            return task if predicate(task) else None

        return await wait_for(probe, timeout=timeout, interval=0.2, what=f"{what} ({task_id})")

    async def wait_status(
        self, task_id: str, status: str, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait until the task has this status."""
        return await self.wait_task(
            task_id, lambda t: t["status"] == status, timeout=timeout, what=f"status {status}"
        )

    async def wait_image(self, task_id: str, *, timeout: float = 40.0) -> dict[str, Any]:
        """Wait until the task's image is stored or has failed for good."""
        return await self.wait_task(
            task_id,
            lambda t: t["image"] is not None and t["image"]["status"] in ("stored", "failed"),
            timeout=timeout,
            what="the image to settle",
        )

    async def image(self, task_id: str) -> httpx.Response:
        """GET /tasks/{id}/image."""
        return await self.client.get(f"/tasks/{task_id}/image")

    # -- the provider's side ---------------------------------------------------------

    def callback_url(self, task_id: str, token: str | None = None) -> str:
        """The webhook URL of a task, with its real token unless one is given."""
        token = token if token is not None else sign(task_id, WEBHOOK_SECRET)
        return f"{self.service_url}{WEBHOOK_PATH}/{task_id}/{token}"

    async def post_callback(
        self, task_id: str, body: Any, *, token: str | None = None
    ) -> httpx.Response:
        """POST a callback body to the webhook as the provider would (no bearer token)."""
        async with httpx.AsyncClient(timeout=15, trust_env=False) as provider:
            return await provider.post(
                self.callback_url(task_id, token),
                content=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )

    # -- inspection ------------------------------------------------------------------

    def logs(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """The service's log lines (every run), filtered by event name and field values."""
        return [
            line
            for line in self.service.log_lines()
            if (event is None or line.get("event") == event)
            and all(line.get(key) == value for key, value in fields.items())
        ]

    def all_logs(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Like ``logs``, over the service and every extra worker."""
        lines = [line for p in [self.service, *self.workers] for line in p.log_lines()]
        return [
            line
            for line in lines
            if (event is None or line.get("event") == event)
            and all(line.get(key) == value for key, value in fields.items())
        ]

    def stored_files(self) -> list[Path]:
        """Every stored original in the storage directory (temp files and the WebP
        variants written beside them excluded)."""
        return [path for path in self._objects() if not _is_variant(path)]

    def variant_files(self) -> list[Path]:
        """The WebP variants (`<key>.thumb.webp`, `<key>.preview.webp`) in storage."""
        return [path for path in self._objects() if _is_variant(path)]

    def _objects(self) -> list[Path]:
        if not self.storage_dir.exists():
            return []
        return sorted(
            path
            for path in self.storage_dir.rglob("*")
            if path.is_file() and ".tmp" not in path.relative_to(self.storage_dir).parts
        )

    async def variants_made(self, count: int = 2) -> None:
        """Until `count` WebP variants are stored. They are rendered after the image is
        recorded, from a spool copy of it that is removed before they are stored: a
        test that checks the spool is empty waits for them first."""

        async def made() -> bool:
            return len(self.variant_files()) >= count

        await wait_for(made, what=f"{count} variants")

    def spool_files(self, pattern: str = "*.part") -> list[Path]:
        """Download temp files left in the storage's ``.tmp`` directory."""
        spool = self.storage_dir / ".tmp"
        return sorted(spool.glob(pattern)) if spool.exists() else []

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one SQL statement on the stack's database (for fast-forwarding and checks)."""
        if self._engine is None:
            self._engine = create_async_engine(self.database_url)
        async with self._engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []


def _is_variant(path: Path) -> bool:
    return path.name.endswith((".thumb.webp", ".preview.webp"))
