"""A sandbox service (`imagetasks serve --sandbox`) as its own process."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from dotenv import dotenv_values

from tests.ports import free_port

from .helpers import IMAGETASKS, Sandbox, clean_env


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """`imagetasks serve --sandbox` in a temp directory: its .env and var/ live there."""
    directory = tmp_path_factory.mktemp("sandbox")
    port = free_port()
    log = (directory / "service.log").open("w")
    process = subprocess.Popen(
        [IMAGETASKS, "serve", "--sandbox", "--port", str(port)],
        cwd=directory,
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((directory / "service.log").read_text()[-3000:])
            time.sleep(0.1)
        token = str(dotenv_values(directory / ".env")["API_TOKENS"]).split(",")[0]
        yield Sandbox(url=url, token=token, directory=directory)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
