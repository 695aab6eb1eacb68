"""Build the Dockerfile and run the image for real, without a Docker engine.

1. A stand-in for the official ``python:3.11-slim``: Debian bookworm (Python
   3.11 as ``python3`` with its venv module, ``useradd``, CA certificates),
   made with debootstrap from this machine's Debian mirror. It is kept as a
   local image tagged by its recipe, so later runs reuse it.
2. The project's Dockerfile built on it with ``buildah bud --isolation chroot``
   (``--build-arg PYTHON_IMAGE=<stand-in>``). pip inside the build trusts the
   machine's CA bundle, mounted for the build only.
3. The image run with ``buildah run --isolation chroot`` (host network) on the
   local PostgreSQL, in a database of its own dropped at the end:
   ``imagetasks migrate``, the StarMagic simulator, then the image's own command
   (its port moved to a free loopback one), its HEALTHCHECK, and one task from
   submission to its stored image.

Run it as ``make container-test`` (root, with buildah and debootstrap
installed). Exit status 0 when every check passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.ports import free_port
from tests.postgres import POSTGRES_URL, admin, postgres_reachable, run_async, server_database_url

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates", "passwd"]
BASE_RECIPE = f"{SUITE} minbase {','.join(BASE_PACKAGES)} v1"
BASE_TAG = hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:10]
BASE_IMAGE = f"localhost/imagetasks-test-base:{SUITE}-{BASE_TAG}"
IMAGE = "localhost/imagetasks:container-test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ISOLATION = ["--isolation", "chroot"]
API_TOKEN = "container-token-" + "d" * 24
SIM_KEY = "sim-key"
TIMEOUT = 120.0


class Checks:
    """Counts what was checked; a failed check stops the run."""

    def __init__(self) -> None:
        self.passed = 0

    def ok(self, condition: bool, what: str, detail: str = "") -> None:
        """Record one check; raise with `detail` when it failed."""
        if not condition:
            raise AssertionError(f"{what}: {detail}" if detail else what)
        self.passed += 1
        print(f"ok   {what}", flush=True)


def step(message: str) -> None:
    """Say what happens next."""
    print(f"---- {message}", flush=True)


def run(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, its output shown unless captured."""
    return subprocess.run(args, check=check, text=True, capture_output=capture)


def buildah(*args: str) -> str:
    """One buildah command; its standard output."""
    return run("buildah", *args, capture=True).stdout.strip()


def image_exists(name: str) -> bool:
    """True when the local image store has this name."""
    return (
        run("buildah", "inspect", "--type", "image", name, capture=True, check=False).returncode
        == 0
    )


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (DEBIAN_MIRROR overrides it)."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"(?m)^URIs:\s*(\S+)", stanza)
            suites = re.search(r"(?m)^Suites:\s*(.+)$", stanza)
            if uris and suites and not suites[1].split()[0].endswith("-security"):
                return uris[1]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.exists():
            found = re.search(r"(?m)^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", path.read_text())
            if found and "security" not in found[1]:
                return found[1]
    raise SystemExit("no Debian mirror found in apt's sources; set DEBIAN_MIRROR")


def build_base() -> None:
    """The python:3.11-slim stand-in, made once per recipe."""
    if image_exists(BASE_IMAGE) and not os.environ.get("CONTAINER_TEST_REBUILD_BASE"):
        print(f"base image {BASE_IMAGE} is cached", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="imagetasks-base-", dir="/var/tmp") as work:
        rootfs = Path(work) / "rootfs"
        mirror = debian_mirror()
        print(f"debootstrap {SUITE} from {mirror} (a few minutes, once)", flush=True)
        made = run(
            "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
            SUITE, str(rootfs), mirror, capture=True, check=False,
        )  # fmt: skip
        if made.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{(made.stdout + made.stderr)[-3000:]}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        archive = Path(work) / "rootfs.tar"
        run("tar", "-C", str(rootfs), "-cf", str(archive), ".")
        container = buildah("from", "--name", f"imagetasks-base-{os.getpid()}", "scratch")
        try:
            buildah("add", container, str(archive), "/")
            buildah(
                "config",
                "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "LANG=C.UTF-8",
                "--cmd", '["python3"]',
                container,
            )  # fmt: skip
            buildah("commit", "--quiet", container, BASE_IMAGE)
        finally:
            run("buildah", "rm", container, capture=True, check=False)


def build_image() -> None:
    """The project's Dockerfile on the stand-in base."""
    previous = buildah("images", "--quiet", "--no-trunc", IMAGE) if image_exists(IMAGE) else ""
    with tempfile.TemporaryDirectory(prefix="imagetasks-pip-") as work:
        # pip in the image's venv reads /etc/pip.conf: trust the machine's CA bundle.
        pip_conf = Path(work) / "pip.conf"
        pip_conf.write_text(f"[global]\ncert = {CA_BUNDLE}\n")
        run(
            "buildah", "bud", *ISOLATION, "--format", "docker", "--layers",
            "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
            "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
            "--volume", f"{pip_conf}:/etc/pip.conf:ro",
            "--tag", IMAGE, str(ROOT),
        )  # fmt: skip
    current = buildah("images", "--quiet", "--no-trunc", IMAGE)
    if previous and previous != current:  # the last run's image, now untagged
        run("buildah", "rmi", previous, capture=True, check=False)


def image_config() -> dict[str, Any]:
    """The built image's Docker config (Cmd, User, Healthcheck, ...)."""
    inspected = json.loads(buildah("inspect", "--type", "image", IMAGE))
    config: dict[str, Any] = inspected["Docker"]["config"]
    return config


class Container:
    """A working container of the image, with its environment set."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = buildah("from", "--name", name, IMAGE)
        for key, value in env.items():
            buildah("config", "--env", f"{key}={value}", self.name)
        self.children: list[subprocess.Popen[str]] = []

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run a command in it to the end; its output captured."""
        return run(
            "buildah", "run", *ISOLATION, self.name, "--", *command, capture=True, check=False
        )

    def start(self, log: Path, *command: str) -> subprocess.Popen[str]:
        """Start a long-running command in it (own process group), output to `log`."""
        with log.open("w") as out:
            child = subprocess.Popen(
                ["buildah", "run", *ISOLATION, self.name, "--", *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        self.children.append(child)
        return child

    def remove(self) -> None:
        """Stop what it runs (SIGTERM to each child's group, then SIGKILL) and delete it."""
        for child in self.children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        run("buildah", "rm", self.name, capture=True, check=False)


def wait_until(probe: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def answers(url: str, child: subprocess.Popen[str], log: Path) -> bool:
    """True once `url` answers 200; fails when the process behind it has exited."""
    if child.poll() is not None:
        raise AssertionError(f"exited with {child.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(url, timeout=3, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def database() -> Iterator[str]:
    """A new database on the local PostgreSQL, dropped afterwards."""
    problem = run_async(postgres_reachable)
    if problem:
        raise SystemExit(f"PostgreSQL at {POSTGRES_URL} is unreachable ({problem})")
    name = f"imagetasks_container_{os.getpid()}_{secrets.token_hex(3)}"
    run_async(admin, f'CREATE DATABASE "{name}"')
    try:
        yield server_database_url(name)
    finally:
        run_async(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def exercise(checks: Checks, logs: Path) -> None:
    """Migrate, serve and complete one task with the image's own command."""
    config = image_config()
    checks.ok(
        config.get("User") not in (None, "", "root", "0"), "the image runs as a non-root user"
    )
    healthcheck = config.get("Healthcheck") or {}
    checks.ok(bool(healthcheck.get("Test")), "the image has a HEALTHCHECK", str(config))
    command: list[str] = config["Cmd"]
    checks.ok(command[:2] == ["imagetasks", "serve"], "the image's command serves", str(command))

    sim_port, port = free_port(), free_port()
    # The image's command with a free loopback port: the container shares the host's network.
    serve = [*command]
    serve[serve.index("--port") + 1] = str(port)
    serve[serve.index("--host") + 1] = "127.0.0.1"
    service_url = f"http://127.0.0.1:{port}"
    suffix = f"{os.getpid()}-{secrets.token_hex(2)}"
    containers: list[Container] = []
    with database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "STARMAGIC_BASE_URL": f"http://127.0.0.1:{sim_port}",
            "STARMAGIC_API_KEY": SIM_KEY,
            "PUBLIC_BASE_URL": service_url,
            "ALLOW_INSECURE_CALLBACKS": "true",
            "DOWNLOAD_ALLOW_PRIVATE_NETWORKS": "true",
            "WEBHOOK_SECRET": "container-webhook-secret-0123456789",
            "API_TOKENS": API_TOKEN,
            "LOG_FORMAT": "json",
        }
        try:
            app = Container(f"imagetasks-app-{suffix}", env)
            containers.append(app)
            sim = Container(f"imagetasks-sim-{suffix}", {})
            containers.append(sim)

            uid = app.run("id", "-u").stdout.strip()
            checks.ok(uid not in ("", "0"), f"commands in the image run as uid {uid}")
            where = app.run("python3", "-c", "import app; print(app.__file__)").stdout
            checks.ok("/site-packages/app/" in where, "the project is a regular install", where)
            leftovers = app.run("sh", "-c", "ls -A /src /srv/imagetasks/.env /srv/imagetasks/.venv")
            checks.ok(
                leftovers.returncode != 0 and not leftovers.stdout, "no sources, .env or .venv"
            )

            step("imagetasks migrate (the compose file's one-shot migrate service)")
            migrated = app.run("imagetasks", "migrate")
            print(migrated.stdout + migrated.stderr, end="", flush=True)
            checks.ok(migrated.returncode == 0, "migrate exits 0", migrated.stderr[-2000:])

            step("the simulator, from the image")
            sim_log = logs / "simulator.log"
            sim_args = ["--host", "127.0.0.1", "--port", str(sim_port), "--time-scale", "0.02"]
            simulator = sim.start(sim_log, "imagetasks", "simulator", *sim_args)
            wait_until(
                lambda: answers(f"http://127.0.0.1:{sim_port}/_sim/stats", simulator, sim_log),
                "the simulator",
            )

            step(f"the image's command: {' '.join(serve)}")
            service_log = logs / "service.log"
            service = app.start(service_log, *serve)
            wait_until(lambda: answers(f"{service_url}/readyz", service, service_log), "/readyz")
            ready = httpx.get(f"{service_url}/readyz", trust_env=False).json()
            expected = {"status": "ready", "checks": {"database": "ok", "storage": "ok"}}
            checks.ok(ready == expected, f"/readyz is ready: {ready}", str(ready))

            probe = [part.replace(":8000/", f":{port}/") for part in healthcheck["Test"][1:]]
            health = app.run(*probe)
            checks.ok(health.returncode == 0, "the HEALTHCHECK command passes", health.stderr)

            step("one task, submitted to the container, through to its stored image")
            client = httpx.Client(
                base_url=service_url,
                headers={"Authorization": f"Bearer {API_TOKEN}"},
                timeout=30,
                trust_env=False,
            )
            with client:
                response = client.post("/tasks", json={"prompt": "a lighthouse at dawn"})
                checks.ok(response.status_code == 202, "POST /tasks is accepted", response.text)
                task_id = response.json()["id"]

                def stored() -> dict[str, Any] | None:
                    task: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
                    image = task.get("image") or {}
                    if image.get("status") == "failed":
                        raise AssertionError(f"the image failed: {task}")
                    return task if image.get("status") == "stored" else None

                task = wait_until(stored, f"task {task_id} to be stored")
                checks.ok(task["status"] == "completed", f"task {task_id} completed")
                image = client.get(f"/tasks/{task_id}/image")
                digest = hashlib.sha256(image.content).hexdigest()
                checks.ok(
                    image.status_code == 200 and digest == task["image"]["sha256"],
                    f"its image is stored ({len(image.content)} bytes, sha256 {digest[:12]}…)",
                )
            listed = app.run(
                "find", "var/images", "-path", "*/.tmp", "-prune", "-o", "-type", "f", "-print"
            )
            files = sorted(listed.stdout.split())
            originals = [
                name for name in files if not name.endswith((".thumb.webp", ".preview.webp"))
            ]
            checks.ok(
                len(originals) == 1 and task_id in originals[0],
                f"the image is in the container: {originals}",
            )
            checks.ok(
                sorted(name.rsplit("/", 1)[-1] for name in files if name not in originals)
                == [f"{task_id}.preview.webp", f"{task_id}.thumb.webp"],
                f"its two WebP variants sit beside it: {files}",
            )
        finally:
            for container in containers:
                container.remove()
        events = [
            json.loads(line)
            for line in service_log.read_text().splitlines()
            if line.startswith("{")
        ]
        stored_events = [e for e in events if e.get("event") == "image_stored"]
        checks.ok(bool(stored_events), "the service logged the stored image as a JSON line")


def main() -> int:
    """Build, run, report; 0 when every check passed."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install -y buildah debootstrap", file=sys.stderr)
            return 2
    if not CA_BUNDLE.exists():
        print(f"{CA_BUNDLE} is missing: apt-get install -y ca-certificates", file=sys.stderr)
        return 2
    checks = Checks()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="imagetasks-container-") as work:
        try:
            step(f"stand-in base image {BASE_IMAGE}")
            build_base()
            step(f"docker build of the Dockerfile on it -> {IMAGE}")
            build_image()
            exercise(checks, Path(work))
        except (AssertionError, subprocess.CalledProcessError) as exc:
            failed = 1
            print(f"FAIL {exc}", file=sys.stderr, flush=True)
            for log in sorted(Path(work).glob("*.log")):
                print(f"---- {log.name} (last lines)\n{log.read_text()[-3000:]}", file=sys.stderr)
    print(f"container: {checks.passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
