"""`imagetasks serve`: the sandbox banner once the port is ours, a clear line when it is not."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

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
