"""Several service replicas on one database and one storage, behind the round-robin
forwarder, built on the end-to-end ``Stack``: the simulator and replica 0 are the
stack's own processes, the other replicas are extra ``imagetasks serve`` processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.api.deps import caller_id
from app.callback_urls import WEBHOOK_PATH, sign
from app.simulator.images import image_seed, padded_png, render_png
from app.webhooks.signing import default_secret
from tests.chaos.proxy import RoundRobinProxy
from tests.e2e.stack import (
    API_TOKEN,
    SIM_IMAGE_SIZE,
    Process,
    Stack,
    free_port,
    sha256,
    wait_for,
)

TERMINAL = ("completed", "failed", "cancelled")
TABLES = ("tasks", "images", "callback_deliveries", "idempotency_records")
# Long, unique secrets, so a leak in a log line cannot be a coincidence.
CHAOS_SIM_KEY = "chaos-sim-key-" + secrets.token_hex(12)
SECOND_TOKEN = "chaos-second-token-" + secrets.token_hex(12)
WEBHOOK_SECRET = "chaos-webhook-secret-" + secrets.token_hex(12)
_HEX_RUN = re.compile(r"[0-9a-f]{32,}")


def expected_png_sha256(upstream_id: str) -> str:
    """The sha256 of the image the simulator serves for this task (no fault applied)."""
    return sha256(render_png(upstream_id, SIM_IMAGE_SIZE, SIM_IMAGE_SIZE))


async def expected_sha256(
    upstream_id: str, image_size: int | None = None, position: int = 0
) -> str:
    """The sha256 of an image served for this task, padded to ``image_size`` if given."""
    base = render_png(image_seed(upstream_id, position), SIM_IMAGE_SIZE, SIM_IMAGE_SIZE)
    digest = hashlib.sha256()
    async for chunk in padded_png(base, image_size):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Kill:
    """One SIGKILL of a replica, and what it interrupted."""

    replica: int
    pid: int
    moment: str  # mid-submit | mid-download | mid-callback | random
    interrupted_downloads: list[str] = field(default_factory=list)


class Cluster(Stack):
    """A simulator, ``replicas`` services sharing a database and storage, a forwarder."""

    def __init__(
        self,
        root: Path,
        database_url: str,
        *,
        replicas: int = 2,
        **service_env: str | int | float | bool,
    ) -> None:
        self.proxy_port = free_port()
        env: dict[str, str | int | float | bool] = {
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.proxy_port}",
            "STARMAGIC_API_KEY": CHAOS_SIM_KEY,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "API_TOKENS": f"{API_TOKEN},{SECOND_TOKEN}",
            "RUN_BACKGROUND": True,
        }
        env.update({name.upper(): value for name, value in service_env.items()})
        super().__init__(root, database_url, **env)
        args = self.simulator.args
        args[args.index("--api-key") + 1] = CHAOS_SIM_KEY
        self.replicas: list[Process] = [self.service]
        self.replica_urls = [self.service_url]
        for number in range(1, replicas):
            port = free_port()
            serve = ["serve", "--host", "127.0.0.1", "--port", str(port)]
            self.replicas.append(Process(f"service{number}", serve, self.env, root))
            self.replica_urls.append(f"http://127.0.0.1:{port}")
        self.clients = [self.client] + [
            httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {API_TOKEN}"},
                timeout=30,
                trust_env=False,
            )
            for url in self.replica_urls[1:]
        ]
        self.proxy = RoundRobinProxy(self.proxy_port, self.replica_urls)
        self.kills: list[Kill] = []
        self.restarts = 0
        self.webhook_secrets: set[str] = set(str(self.env["WEBHOOK_SECRET"]).split(","))
        self._db: AsyncEngine | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> Cluster:
        """The simulator, the forwarder, then every replica; return once all answer."""
        self.simulator.start()
        await self._wait_http(self.simulator, f"{self.simulator_url}/_sim/stats")
        await asyncio.to_thread(self.proxy.start)
        for replica in self.replicas:
            replica.start()
        await asyncio.gather(*(self.wait_ready(i) for i in range(len(self.replicas))))
        return self

    async def wait_ready(self, index: int) -> None:
        """Wait until replica ``index`` answers /readyz with 200."""
        await self._wait_http(self.replicas[index], f"{self.replica_urls[index]}/readyz")

    async def kill(self, index: int, moment: str) -> Kill:
        """SIGKILL replica ``index``; note the downloads it held leases on."""
        replica = self.replicas[index]
        assert replica.pid is not None
        pid = replica.pid
        self.proxy.mark_down(index)
        replica.kill()
        rows = await self.query(
            "SELECT task_id FROM images WHERE status = 'pending' AND lease_owner LIKE :owner",
            owner=f"%:{pid}:%",
        )
        kill = Kill(index, pid, moment, sorted(row[0] for row in rows))
        self.kills.append(kill)
        return kill

    async def restart(self, index: int) -> None:
        """Start replica ``index`` again on its port and wait until it is ready."""
        self.replicas[index].start()
        await self.wait_ready(index)
        self.restarts += 1
        self.proxy.mark_up(index)

    async def restart_gracefully(self, index: int, **env: str) -> None:
        """SIGTERM replica ``index``, change its environment, start it again."""
        self.proxy.mark_down(index)
        await asyncio.to_thread(self.replicas[index].stop)
        self.replicas[index].env.update(env)
        if "WEBHOOK_SECRET" in env:
            self.webhook_secrets.update(env["WEBHOOK_SECRET"].split(","))
        await self.restart(index)

    async def close(self) -> None:
        """Stop the extra replicas and the forwarder, then the stack itself."""
        for replica in self.replicas[1:]:
            await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(self.proxy.stop)
        for client in self.clients[1:]:
            await client.aclose()
        if self._db is not None:
            await self._db.dispose()
        await super().close()

    def callback_url(self, task_id: str, token: str | None = None) -> str:
        """A task's webhook URL on replica 0, signed with the current signing secret."""
        signing = str(self.replicas[0].env["WEBHOOK_SECRET"]).split(",")[0]
        token = token if token is not None else sign(task_id, signing)
        return f"{self.service_url}{WEBHOOK_PATH}/{task_id}/{token}"

    # -- inspection ------------------------------------------------------------------

    async def query(self, statement: str, **params: Any) -> list[Any]:
        """One SQL statement on the shared database (survives a database restart)."""
        async with self._database().begin() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []

    async def table(self, name: str) -> list[dict[str, Any]]:
        """Every row of one of the service's tables, in a stable order."""
        assert name in TABLES, name
        async with self._database().connect() as connection:
            result = await connection.execute(text(f"SELECT * FROM {name}"))  # noqa: S608
            rows = [dict(row._mapping) for row in result]
        return sorted(rows, key=repr)

    def _database(self) -> AsyncEngine:
        if self._db is None:
            self._db = create_async_engine(self.database_url, pool_pre_ping=True)
        return self._db

    async def wait_settled(self, *, timeout: float, expected: int | None = None) -> list[Any]:
        """Wait until every task is terminal and every completed one's image has settled."""

        async def settled() -> list[Any] | None:
            for index, replica in enumerate(self.replicas):
                if index not in self.proxy.down:
                    replica.check_alive()
            rows = await self.query(
                "SELECT id, status, image_status FROM tasks ORDER BY id",
            )
            if expected is not None and len(rows) < expected:
                return None
            done = all(
                status in TERMINAL and (status != "completed" or image in ("stored", "failed"))
                for _, status, image in rows
            )
            return rows if done else None

        return await wait_for(settled, timeout=timeout, interval=1.0, what="every task to settle")

    def processes(self) -> list[Process]:
        """Every process this cluster started: replicas, workers, simulator."""
        return [*self.replicas, *self.workers, self.simulator]

    def service_logs(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """JSON log lines of every replica and worker, filtered like ``Stack.logs``."""
        lines = [line for p in [*self.replicas, *self.workers] for line in p.log_lines()]
        return [
            line
            for line in lines
            if (event is None or line.get("event") == event)
            and all(line.get(key) == value for key, value in fields.items())
        ]

    def spool_leftovers(self) -> list[Path]:
        """Every file left in ``<storage>/.tmp`` (download spool files and probes)."""
        spool = self.storage_dir / ".tmp"
        return sorted(spool.iterdir()) if spool.is_dir() else []

    async def secrets(self) -> dict[str, str]:
        """Every secret of this cluster, by a label that does not reveal it: the API
        tokens, the simulator key, the webhook secrets, every task's callback tokens and
        the secrets that sign webhooks to callers."""
        found = {
            "API token": API_TOKEN,
            "second API token": SECOND_TOKEN,
            "simulator API key": CHAOS_SIM_KEY,
        }
        for number, secret in enumerate(sorted(self.webhook_secrets)):
            found[f"webhook secret #{number}"] = secret
        # Webhook signing secrets: each endpoint's, and each token's default one.
        for endpoint_id, secret in await self.query("SELECT id, secret FROM webhook_endpoints"):
            found[f"signing secret of {endpoint_id}"] = secret
        for label, token in (("API token", API_TOKEN), ("second API token", SECOND_TOKEN)):
            for number, secret in enumerate(sorted(self.webhook_secrets)):
                default = default_secret(secret, caller_id(token))
                found[f"default webhook secret of the {label} under secret #{number}"] = default
        ids = [row[0] for row in await self.query("SELECT id FROM tasks")]
        for task_id in ids:
            for number, secret in enumerate(sorted(self.webhook_secrets)):
                found[f"callback token of {task_id} under secret #{number}"] = sign(task_id, secret)
        return found


def leaks(processes: Iterable[Process], secrets_by_label: dict[str, str]) -> list[str]:
    """``process: label`` for every secret found in a process's output (values not shown)."""
    tokens = {v: k for k, v in secrets_by_label.items() if _HEX_RUN.fullmatch(v)}
    others = {k: v for k, v in secrets_by_label.items() if v not in tokens}
    found: list[str] = []
    for process in processes:
        output = process.output()
        for label, value in others.items():
            if value in output:
                found.append(f"{process.name}: {label}")
        for run in _HEX_RUN.findall(output):
            for start in range(len(run) - 31):
                token_label = tokens.get(run[start : start + 32])
                if token_label is not None:
                    found.append(f"{process.name}: {token_label}")
    return sorted(set(found))


def log_line_count(processes: Iterable[Process]) -> int:
    """Lines written by these processes so far."""
    return sum(len(p.output().splitlines()) for p in processes)
