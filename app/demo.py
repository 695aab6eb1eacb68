"""`imagetasks demo`: the sandbox on a free loopback port, one task followed from
submission to its stored image, then the server stops.

Data goes to ./var and the token to ./.env, the same places `imagetasks serve
--sandbox` (`make run`) uses: the file the demo points at is still there afterwards,
and the sandbox shows the task again. A temporary directory would delete the very
image the demo just printed. Database and storage are pinned to ./var even when the
environment names others, so the demo never writes to a configured database or bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from rich.markup import escape

from app.cli import run_migrations
from app.client.api import ApiClient, Task
from app.client.errors import FAILED, CliError
from app.client.output import err, print_fields
from app.client.progress import Peek, wait_for_image
from app.config import Settings, SettingsError
from app.demo_receiver import DemoReceiver, Received
from app.logging import configure_logging, uvicorn_log_config
from app.main import create_app
from app.sandbox import prepare_sandbox

START_TIMEOUT = 30.0
WEBHOOK_TIMEOUT = 15.0


class SandboxError(Exception):
    """The sandbox did not start or stop cleanly."""


class SandboxServer:
    """The sandbox app served by uvicorn in a background thread, logging to a file."""

    def __init__(self, var: Path) -> None:
        self.var = var
        self.log_path = var / "demo.log"
        self.settings: Settings | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def origin(self) -> str:
        assert self.settings is not None
        return self.settings.public_base_url

    def start(self) -> Settings:
        """Bind a free port, migrate, and serve; returns the sandbox settings."""
        self.var.mkdir(parents=True, exist_ok=True)
        # Holding the bound socket, rather than probing for a free port, leaves no race.
        self._sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        settings, simulator = prepare_sandbox("127.0.0.1", sock.getsockname()[1])
        settings = settings.model_copy(
            update={
                "database_url": f"sqlite+aiosqlite:///{self.var / 'imagetasks.db'}",
                "storage_url": f"file://{self.var / 'images'}",
                "log_format": "json",
            }
        )
        self.settings = settings
        self._log_to_file(settings)
        run_migrations(settings.database_url)
        config = uvicorn.Config(
            create_app(settings, simulator=simulator),
            log_config=uvicorn_log_config(),
            timeout_graceful_shutdown=5,
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="sandbox", daemon=True
        )
        # The sandbox prints its banner (a token, curl lines for a server about to
        # vanish) to stderr at startup; it belongs in the log, not in the demo.
        with self.log_path.open("a") as log, contextlib.redirect_stderr(log):
            self._thread.start()
            deadline = time.monotonic() + START_TIMEOUT
            while not server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise SandboxError(f"the sandbox did not start; see {self.log_path}")
                time.sleep(0.05)
        return settings

    def _log_to_file(self, settings: Settings) -> None:
        configure_logging(settings)
        root = logging.getLogger()
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(root.handlers[0].formatter)
        root.handlers[:] = [handler]

    def stop(self) -> None:
        """Ask uvicorn to shut down (lifespan included) and wait for it."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        if self._sock is not None:
            self._sock.close()


def _upstream_peek(settings: Settings) -> tuple[httpx.Client, Peek]:
    """Read the simulated StarMagic's own progress: it calls back only at the end, so
    until then the service itself still says `pending`."""
    client = httpx.Client(
        base_url=settings.starmagic_base_url,
        headers={"Authorization": f"Bearer {settings.starmagic_api_key}"},
        timeout=5,
    )

    def peek(task: Task) -> tuple[str, int] | None:
        if not task.get("upstream_task_id"):
            return None
        try:
            data = client.get(f"/v1/tasks/{task['upstream_task_id']}").json()["data"]
            status, progress = str(data["status"]), int(data.get("progress") or 0)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        label = status if status == task["status"] else f"{status} at StarMagic"
        return label, progress

    return client, peek


def _stored_file(images: Path, task_id: str, sha256: str) -> Path | None:
    """The task's file under the storage root, if its bytes match the sha256."""
    for path in images.glob(f"*/*/*/{task_id}.*"):
        if hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
    return None


def _follow(
    server: SandboxServer, settings: Settings, prompt: str, timeout: float, receiver: DemoReceiver
) -> tuple[Task, Received | None, str]:
    """Submit with a webhook_url on the built-in receiver; the stored task, the signed
    image.stored webhook it got (None: none came) and the token's default secret."""
    peek_client, peek = _upstream_peek(settings)
    with peek_client, ApiClient(server.origin, settings.api_tokens[0]) as client:
        task = client.submit(
            {
                "prompt": prompt,
                "metadata": {"source": "imagetasks demo"},
                "webhook_url": receiver.url,
                "webhook_events": ["image.stored"],
            }
        )
        err.print(f"submitted task {task['id']}: [italic]{escape(prompt)}[/]")
        task = wait_for_image(client, task["id"], timeout=timeout, interval=0.2, peek=peek)
        response = client.http.get(f"/tasks/{task['id']}/image")
        if hashlib.sha256(response.content).hexdigest() != task["image"]["sha256"]:
            raise CliError("the image served by the API does not match its sha256", FAILED)
        secret = str(client.request("GET", "/webhook-endpoints/default/secret")["secret"])
        webhook = receiver.wait("image.stored", WEBHOOK_TIMEOUT)
    return task, webhook, secret


def _show_webhook(webhook: Received | None, secret: str) -> bool:
    """The signed webhook as the receiver saw it; whether its signature verified."""
    if webhook is None:
        err.print(f"\n[red]no image.stored webhook arrived within {WEBHOOK_TIMEOUT:g} s[/]")
        return False
    err.print("\nThe built-in receiver got this signed webhook:", markup=False)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature", "content-type"):
        err.print(f"  {name}: {webhook.headers.get(name, '')}", markup=False)
    body = webhook.body.decode(errors="replace")
    err.print(
        f"  body ({len(webhook.body)} bytes): {body[:300]}{'…' if len(body) > 300 else ''}",
        markup=False,
    )
    if webhook.verified(secret):
        err.print(f"  signature: [green]verified[/] with the token's default secret {secret}")
        return True
    err.print(f"  signature: [red]NOT verified[/] with the token's default secret {secret}")
    return False


def run_demo(prompt: str, timeout: float = 60.0) -> int:
    """Run the demo; returns the process exit code."""
    var = Path.cwd() / "var"
    server = SandboxServer(var)
    receiver = DemoReceiver().start()
    err.print("Starting the sandbox: the service with a simulated StarMagic, data in ./var")
    try:
        settings = server.start()
        task, webhook, secret = _follow(server, settings, prompt, timeout, receiver)
    except SettingsError as exc:  # a ./.env the sandbox cannot use
        err.print(f"demo failed: {exc}", markup=False)
        return 2
    except (CliError, SandboxError) as exc:
        err.print(f"[red]demo failed:[/] {escape(str(exc))}")
        for line in exc.lines if isinstance(exc, CliError) else []:
            err.print(f"  {line}", markup=False)
        if server.settings is not None:
            err.print(f"service log: {server.log_path}")
        return exc.exit_code if isinstance(exc, CliError) else 1
    finally:
        server.stop()
        receiver.stop()
    image = task["image"]
    stored = _stored_file(var / "images", task["id"], image["sha256"])
    print_fields(
        [
            ("task", task["id"]),
            ("file", stored or "not found under ./var/images (its bytes did not match)"),
            ("url", f"{image['url']} (served while the demo ran; `make run` serves port 8000)"),
            ("size", f"{image['size_bytes']} bytes ({image['content_type']})"),
            ("dimensions", f"{image['width']}x{image['height']}"),
            ("sha256", f"{image['sha256']} (verified{' twice' if stored else ''})"),
        ]
    )
    verified = _show_webhook(webhook, secret)
    err.print(
        "\nNext: `make run` keeps the sandbox up on http://127.0.0.1:8000; then try\n"
        f"  export IMAGETASKS_TOKEN={settings.api_tokens[0]}\n"
        '  imagetasks submit "a red bicycle" --wait && imagetasks list',
        markup=False,
    )
    return 0 if verified else FAILED
