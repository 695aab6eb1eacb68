"""Storage fixtures: both backends, the S3 one against a real moto server process."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import httpx
import pytest
import pytest_asyncio

from app.storage import LocalStorage, S3Storage, Storage
from tests.ports import free_port

BUCKET = "imagetasks-test"
MakeS3 = Callable[..., S3Storage]


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and the settings to reach it."""

    endpoint: str
    env: dict[str, str]

    def client(self) -> Any:
        """A boto3 S3 client for inspecting what the backend stored."""
        return boto3.client("s3", endpoint_url=self.endpoint, **_BOTO_AUTH)


_BOTO_AUTH = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode as a separate process, with a test bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the moto S3 server did not start")
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, **_BOTO_AUTH).create_bucket(Bucket=BUCKET)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        yield S3Server(endpoint, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def make_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MakeS3:
    """Build an S3Storage with the server's AWS_* settings (read at construction only)."""

    def make(bucket: str = BUCKET, env: dict[str, str] | None = None) -> S3Storage:
        with monkeypatch.context() as m:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
                m.delenv(name, raising=False)
            for name, value in (env or s3_server.env).items():
                m.setenv(name, value)
            prefix = f"run/{uuid.uuid4().hex}"
            return S3Storage(bucket, prefix, spool_dir=tmp_path / "spool")

    return make


@pytest_asyncio.fixture(params=["local", "s3"], loop_scope="session")
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """Each backend in turn, empty, behind the same interface."""
    store: Storage
    if request.param == "local":
        store = LocalStorage(tmp_path / "images")
    else:
        store = request.getfixturevalue("make_s3")()
    yield store
    await store.aclose()
