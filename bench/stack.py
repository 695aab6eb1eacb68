"""The service and the simulator as separate processes, configured for the benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from bench.procs import PYTHON, Child, clean_env
from tests.ports import free_port

IMAGETASKS = str(Path(PYTHON).with_name("imagetasks"))

API_TOKEN = "bench-token-" + "b" * 24
WEBHOOK_SECRET = "bench-webhook-secret-0123456789abcdef"  # noqa: S105 (a local test value)
SIM_KEY = "sim-key"


class Service:
    """`bench.launcher service`: the real app plus the no-op baseline routes."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=30,
            trust_env=False,
        )


def start_simulator(workdir: Path) -> tuple[Child, str]:
    """The simulator (callbacks dropped, seed route added); its base URL."""
    port = free_port()
    child = Child(
        "simulator",
        [PYTHON, "-m", "bench.launcher", "simulator", "--port", str(port)],
        clean_env({}),
        workdir,
    ).start()
    url = f"http://127.0.0.1:{port}"
    child.wait_http(f"{url}/_sim/faults")
    return child, url


def _env(
    workdir: Path, database_url: str, simulator_url: str, port: int, settings: dict[str, Any]
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "STORAGE_URL": f"file://{workdir / 'images'}",
        "STARMAGIC_BASE_URL": simulator_url,
        "STARMAGIC_API_KEY": SIM_KEY,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "API_TOKENS": API_TOKEN,
        "ALLOW_INSECURE_CALLBACKS": True,
        "DOWNLOAD_ALLOW_PRIVATE_NETWORKS": True,
        "LOG_FORMAT": "json",
        "RUN_BACKGROUND": False,
    }
    values.update({key.upper(): value for key, value in settings.items()})
    return values


def start_service(
    workdir: Path, name: str, database_url: str, simulator_url: str, **settings: Any
) -> Service:
    """One service process (one uvicorn worker), JSON logs to a file, as in production.

    `RUN_BACKGROUND` is false unless given: no loops compete with what is measured,
    unless the measurement is of the single-process deployment.
    """
    port = free_port()
    child = Child(
        name,
        [PYTHON, "-m", "bench.launcher", "service", "--port", str(port)],
        clean_env(_env(workdir, database_url, simulator_url, port, settings)),
        workdir,
    ).start()
    service = Service(child, port)
    child.wait_http(f"{service.url}/readyz")
    return service


def start_worker(service: Service, name: str) -> Child:
    """`imagetasks worker` with the service's settings: the README's production shape."""
    env = dict(service.child.env)
    env["RUN_BACKGROUND"] = "true"
    return Child(name, [IMAGETASKS, "worker"], env, service.child.workdir).start()
