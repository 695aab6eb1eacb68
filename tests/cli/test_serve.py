"""`imagetasks serve`: the sandbox banner once the port is ours, a clear line when it is not."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.ports import free_port

from .helpers import IMAGETASKS, Sandbox, clean_env


def test_the_banner_follows_the_bound_socket(sandbox: Sandbox) -> None:
    """The "Try it" lines come after uvicorn reports it is listening, with the right port."""
    log = sandbox.directory / "service.log"
    deadline = time.monotonic() + 60
    while "Try it" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert text.index(f"Uvicorn running on {sandbox.url}") < text.index("Try it")
    assert f"curl -s -X POST {sandbox.url}/tasks" in text


def test_a_taken_port_prints_no_banner_and_says_so(tmp_path: Path) -> None:
    """With the port already in use: exit 1, no banner, one line naming the port and the fix."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [IMAGETASKS, "serve", "--sandbox", "--port", str(port)],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 1
    assert "Try it" not in done.stdout + done.stderr
    assert f"imagetasks: could not listen on 127.0.0.1:{port}" in done.stderr
    assert "make run PORT=" in done.stderr


def _readme_uvicorn_command() -> list[str]:
    """The README's `uvicorn app.main:app …` alternative to `imagetasks serve`, as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if "# or: uvicorn app.main:app" in ln]
    return line.split("# or: ", 1)[1].split()


def test_the_readmes_uvicorn_command_honours_trusted_forwarded_headers(tmp_path: Path) -> None:
    """Run as the README says, a redirect behind the proxy names the public host, as `serve` does.

    uvicorn's own proxy-header handling (on by default) would replace the proxy's address
    by the client's before the app checks TRUSTED_PROXIES, and the forwarded host was lost.
    """
    port = free_port()
    env = clean_env(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'u.db'}",
        STARMAGIC_API_KEY="sk-test-0123456789",
        PUBLIC_BASE_URL="https://public.test:8443",
        WEBHOOK_SECRET="s" * 32,
        API_TOKENS="token-" + "t" * 20,
        RUN_BACKGROUND="false",
        TRUSTED_PROXIES="127.0.0.1",
    )
    bin_dir = Path(IMAGETASKS).parent
    assert (
        subprocess.run([IMAGETASKS, "migrate"], env=env, cwd=tmp_path, check=False).returncode == 0
    )
    command = _readme_uvicorn_command()
    server = subprocess.Popen(
        [str(bin_dir / command[0]), *command[1:], "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/tasks/",
                    headers={
                        "X-Forwarded-For": "203.0.113.5",
                        "X-Forwarded-Proto": "https",
                        "X-Forwarded-Host": "public.test:8443",
                    },
                    timeout=5,
                )
                break
            except httpx.TransportError:
                assert server.poll() is None, "uvicorn exited"
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert response.status_code == 307
    assert response.headers["location"] == "https://public.test:8443/tasks"


def test_a_port_out_of_range_is_refused_as_the_option_it_is(tmp_path: Path) -> None:
    """`--port 70000` names --port, not a PUBLIC_BASE_URL the user never set."""
    result = subprocess.run(
        [IMAGETASKS, "serve", "--sandbox", "--port", "70000"],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert "PUBLIC_BASE_URL" not in result.stderr
