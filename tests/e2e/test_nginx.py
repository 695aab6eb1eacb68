"""The README's nginx configuration, run for real in front of two service replicas.

The configuration is deploy/nginx/imagetasks.conf, which the README shows
verbatim; the test changes only what cannot run here: loopback ports instead
of 443 and 10.0.0.5:80, plain HTTP instead of TLS (the certificate lines are
dropped), the replicas' real ports, and a log directory of its own. nginx runs
in the foreground as a child process with its own prefix and temp dirs.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from app.callback_urls import WEBHOOK_PATH, sign
from tests.e2e.pool import StackPool
from tests.e2e.stack import API_TOKEN, START_TIMEOUT, WEBHOOK_SECRET, Process, Stack, wait_for
from tests.ports import free_port

ASYNC = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "nginx" / "imagetasks.conf"
PREFIX = "/imagetasks"
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()), None
)


def test_the_readme_shows_the_nginx_configuration_verbatim() -> None:
    """README.md carries deploy/nginx/imagetasks.conf unchanged, so the two cannot drift."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", readme, flags=re.DOTALL)
    assert CONFIG.read_text() in blocks


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{CONFIG.name} no longer has exactly one {old!r}"
    return text.replace(old, new)


def local_config(public_port: int, internal_port: int, replicas: list[int], logs: Path) -> str:
    """The shipped configuration with loopback ports, no TLS, and logs under `logs`."""
    text = CONFIG.read_text()
    text = _replace_once(text, "listen 443 ssl;", f"listen 127.0.0.1:{public_port};")
    text = _replace_once(text, "listen 10.0.0.5:80;", f"listen 127.0.0.1:{internal_port};")
    text, dropped = re.subn(r"(?m)^\s*ssl_\w+ .*;\n", "", text)
    assert dropped == 3, "the public server's TLS lines changed"
    for shipped, port in zip(("127.0.0.1:8000;", "127.0.0.1:8001;"), replicas, strict=True):
        text = _replace_once(text, f"server {shipped}", f"server 127.0.0.1:{port};")
    assert text.count("/var/log/nginx/") == 2
    return text.replace("/var/log/nginx/", f"{logs}/")


class Nginx:
    """nginx in the foreground with its own prefix: config, pid, logs and temp dirs."""

    def __init__(self, root: Path, site: str) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        (root / "temp").mkdir()
        (root / "imagetasks.conf").write_text(site)
        temp = "\n".join(
            f"    {kind}_temp_path {root}/temp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # As root, nginx would switch its workers to `nobody`, who cannot enter the test's dirs.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (root / "nginx.conf").write_text(
            f"daemon off;\n{user}worker_processes 1;\npid {root}/nginx.pid;\n"
            f"error_log {self.logs}/error.log info;\n"
            "events { worker_connections 128; }\n"
            f"http {{\n    access_log {self.logs}/access.log;\n{temp}\n"
            f"    include {root}/imagetasks.conf;\n}}\n"
        )
        self.popen: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        assert NGINX is not None
        return [NGINX, "-p", f"{self.root}/", "-c", f"{self.root}/nginx.conf", "-e",
                f"{self.logs}/startup.log", *extra]  # fmt: skip

    def start(self) -> None:
        """Check the configuration, then run nginx until `stop`."""
        checked = subprocess.run(self._command("-t"), capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr
        with (self.logs / "nginx.out").open("wb") as out:
            self.popen = subprocess.Popen(
                self._command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGQUIT)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def check_alive(self) -> None:
        """Fail with nginx's output when it has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            output = (self.logs / "nginx.out").read_text(errors="replace")
            raise AssertionError(f"nginx exited with {self.popen.returncode}:\n{output}")

    def log_text(self) -> str:
        """Every file nginx wrote under its log directory."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.iterdir()))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def nginx_root(tmp_path: Path) -> Path:
    """A directory for nginx; the test is skipped (failed in CI) when nginx is missing."""
    if NGINX is None:
        message = "nginx is not installed (apt-get install nginx); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path / "nginx"
    root.mkdir()
    return root


@pytest.mark.postgres
@ASYNC
async def test_nginx_routes_forwards_and_keeps_callback_tokens_out_of_every_log(
    postgres_stacks: StackPool, nginx_root: Path
) -> None:
    """Behind the README's nginx: right host:port, webhook-only public side, no token logged."""
    public_port, internal_port, second_port = free_port(), free_port(), free_port()
    public = f"http://127.0.0.1:{public_port}"
    internal = f"http://127.0.0.1:{internal_port}"
    stack: Stack = await postgres_stacks.start(
        PUBLIC_BASE_URL=f"{public}{PREFIX}", ROOT_PATH=PREFIX, TRUSTED_PROXIES="127.0.0.1"
    )
    serve = ["serve", "--host", "127.0.0.1", "--port", str(second_port)]
    second = Process("service2", serve, stack.env, stack.root)
    nginx = Nginx(
        nginx_root,
        local_config(
            public_port, internal_port, [stack.service_port, second_port], nginx_root / "logs"
        ),
    )
    api = httpx.AsyncClient(
        base_url=f"{internal}{PREFIX}",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=30,
        trust_env=False,
    )
    outsider = httpx.AsyncClient(base_url=f"{public}{PREFIX}", timeout=30, trust_env=False)
    try:
        second.start()
        await wait_for(
            lambda: _answers(second, second_port), timeout=START_TIMEOUT, what="the second replica"
        )
        nginx.start()

        async def nginx_up() -> bool:
            nginx.check_alive()
            return _listening(public_port) and _listening(internal_port)

        await wait_for(nginx_up, timeout=START_TIMEOUT, what="nginx")

        # Generated URLs carry the host *and port* the caller used, and the prefix.
        submitted = await api.post("/tasks", json={"prompt": "a lighthouse"})
        assert submitted.status_code == 202, submitted.text
        task_id = submitted.json()["id"]
        assert submitted.headers["location"] == f"{internal}{PREFIX}/tasks/{task_id}"
        # Its callbacks come back through the public server and complete it.
        done = await _wait_stored(api, task_id)
        assert done["image"]["url"] == f"{internal}{PREFIX}/tasks/{task_id}/image"
        image = await api.get(f"/tasks/{task_id}/image")
        assert image.status_code == 200
        assert image.headers["etag"].strip('"') == done["image"]["sha256"]
        hooks_log = (nginx.logs / "imagetasks-hooks.log").read_text()
        assert f'POST {PREFIX}{WEBHOOK_PATH}/{task_id}/*** HTTP/1.1" 200' in hooks_log

        # The public side answers only the webhook, and only to POST.
        token = sign(task_id, WEBHOOK_SECRET)
        hook = f"{WEBHOOK_PATH}/{task_id}/{token}"
        assert (await outsider.get("/tasks")).status_code == 404
        bearer = {"Authorization": f"Bearer {API_TOKEN}"}
        assert (
            await outsider.post("/tasks", json={"prompt": "x"}, headers=bearer)
        ).status_code == 404
        assert (await outsider.get(hook)).status_code == 403
        # And the internal side does not take callbacks at all.
        assert (await api.post(hook, json={})).status_code == 404
        # The console is on the internal side only, under the prefix.
        assert (await outsider.get("/console")).status_code == 404
        assert (await outsider.get("/console/sign-in")).status_code == 404
        form = await api.get("/console/sign-in")
        assert form.status_code == 200
        assert f'action="{PREFIX}/console/sign-in"' in form.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf is not None
        signed_in = await api.post(
            "/console/sign-in", data={"token": API_TOKEN, "csrf_token": csrf.group(1)}
        )
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == f"{PREFIX}/console"
        assert f"Path={PREFIX}/console" in signed_in.headers["set-cookie"]
        gallery = await api.get("/console")
        assert gallery.status_code == 200
        assert task_id in gallery.text

        # One replica down: calls fail over to the other.
        await asyncio.to_thread(second.stop)
        later = []
        for number in range(4):
            response = await api.post("/tasks", json={"prompt": f"after failover {number}"})
            assert response.status_code == 202, response.text
            later.append(response.json()["id"])
        for later_id in later:
            await _wait_stored(api, later_id)

        # Both down: the provider's callback gets a 502, and nginx has an upstream error to report.
        await stack.stop_service()
        refused = await outsider.post(hook, json={"task_id": "x"})
        assert refused.status_code == 502
        nginx.check_alive()
    finally:
        await api.aclose()
        await outsider.aclose()
        nginx.stop()
        await asyncio.to_thread(second.stop)

    nginx_logs = nginx.log_text()
    # nginx did write upstream errors (for the internal server, whose requests hold no
    # token): the silence about the public server's failures is the configuration's doing.
    assert "connect() failed" in nginx_logs
    hooks_log = (nginx.logs / "imagetasks-hooks.log").read_text()
    assert f'POST {PREFIX}{WEBHOOK_PATH}/{task_id}/*** HTTP/1.1" 502' in hooks_log
    tokens = {sign(tid, WEBHOOK_SECRET) for tid in [task_id, *later]}
    service_logs = stack.service.output() + second.output()
    assert f"{WEBHOOK_PATH}/{task_id}/***" in service_logs
    for token in tokens:
        assert token not in nginx_logs
        assert token not in service_logs
    # What was checked, for a reader of `pytest -s` (the tokens themselves are never printed).
    upstream_errors = [line for line in nginx_logs.splitlines() if "connect() failed" in line]
    files = len(list(nginx.logs.iterdir()))
    print(
        f"\nnginx {PREFIX}: {len(tokens)} callback tokens, none in {files} nginx log files "
        f"({len(upstream_errors)} upstream errors logged) or the service logs",
        *[f"  hooks log: {line}" for line in hooks_log.splitlines()[-3:]],
        sep="\n",
    )


async def _answers(process: Process, port: int) -> bool:
    process.check_alive()
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        try:
            response = await client.get(f"http://127.0.0.1:{port}/readyz")
        except httpx.TransportError:
            return False
    return response.status_code == 200


async def _wait_stored(api: httpx.AsyncClient, task_id: str) -> dict[str, object]:
    async def stored() -> dict[str, object] | None:
        response = await api.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, object] = response.json()
        image = task["image"]
        return task if isinstance(image, dict) and image["status"] == "stored" else None

    return await wait_for(stored, timeout=90, interval=0.3, what=f"{task_id} stored through nginx")
