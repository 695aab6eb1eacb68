"""No log format ever writes a secret, even when an exception's traceback is logged.

Each test sets unmistakable secret values, forces an unexpected exception on a
real path (the webhook request, a background worker job), and searches what
the logging pipeline wrote: JSON lines, the console renderer, and `auto` on a
pseudo-terminal (where `isatty()` is true, as under `make run`).
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import re
import secrets
import struct
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from app import repository
from app.callback_urls import sign
from app.config import Settings
from app.logging import configure_logging
from app.models import utcnow
from app.worker import BackgroundWorker
from tests.conftest import Service, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body

FAULT = "injected-fault-for-the-log-audit"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_FORMATS = ["json", "console", "auto-pty"]


class CapturedLog:
    """What the logging pipeline wrote, as plain text (terminal colours removed)."""

    def __init__(self, read: Callable[[], str]) -> None:
        self._read = read

    def text(self) -> str:
        return _ANSI.sub("", self._read())

    async def wait_for(self, marker: str, timeout: float = 60.0) -> str:
        """Poll until `marker` was written (generous: the machine is shared)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while marker not in self.text():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{marker!r} never reached the log:\n{self.text()[-2000:]}")
            await asyncio.sleep(0.05)
        return self.text()


def _pty_stderr() -> tuple[io.TextIOWrapper, Callable[[], str], Callable[[], None]]:
    """A pseudo-terminal standing in for stderr, drained by a thread."""
    master, slave = os.openpty()
    # A wide terminal, so that no secret is split across wrapped lines.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream = open(slave, "w", buffering=1, encoding="utf-8", closefd=True)  # noqa: SIM115

    def close() -> None:
        stream.close()
        reader.join(timeout=5)
        os.close(master)

    return stream, lambda: b"".join(chunks).decode("utf-8", "replace"), close


@pytest.fixture(params=LOG_FORMATS)
def captured_log(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Callable[[Settings], CapturedLog]]]:
    """A starter that points stderr at a buffer (or a pseudo-terminal), then configures logging.

    It runs inside the test: pytest swaps its own capture back in between phases.
    """
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping that could split a secret
    closers: list[Callable[[], None]] = []

    def start(settings: Settings) -> CapturedLog:
        if request.param == "auto-pty":
            stream, read, close = _pty_stderr()
            closers.append(close)
            assert stream.isatty()
            monkeypatch.setattr(sys, "stderr", stream)
            captured = CapturedLog(read)
        else:
            buffer = io.StringIO()
            monkeypatch.setattr(sys, "stderr", buffer)
            captured = CapturedLog(buffer.getvalue)
        configure_logging(settings)
        return captured

    yield ("auto" if request.param == "auto-pty" else request.param), start
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()
    for close in closers:
        close()


def secret_settings(database_url: str, tmp_path: Path, log_format: str) -> Settings:
    """Settings whose every secret is a value that cannot appear by chance."""
    return make_settings(
        database_url,
        tmp_path,
        log_format=log_format,
        webhook_secret=f"whsec-canary-{secrets.token_hex(8)},old-whsec-canary-{secrets.token_hex(8)}",
        api_tokens=f"apitoken-canary-{secrets.token_hex(8)}",
        starmagic_api_key=f"smkey-canary-{secrets.token_hex(8)}",
    )


def secret_values(settings: Settings, *extra: str) -> list[str]:
    """Every secret the process knows."""
    return [
        *settings.webhook_secret,
        *settings.api_tokens,
        settings.starmagic_api_key,
        *extra,
    ]


def assert_no_secret(text: str, values: list[str], log_format: str) -> None:
    """Fail, with the count, if any secret is in the text, whole or by its random tail."""
    found = [value for value in values if value in text or value[-16:] in text]
    assert not found, f"{len(found)} of {len(values)} secret values in the {log_format} log"


def failing_upstream() -> httpx.MockTransport:
    """A provider connection that fails in a way nobody planned for."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError(FAULT)

    return httpx.MockTransport(handler)


@pytest.mark.asyncio(loop_scope="session")
async def test_secrets_leaked_into_logs_when_the_webhook_fails_unexpectedly(
    captured_log: tuple[str, Callable[[Settings], CapturedLog]],
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception inside a callback request logs its traceback, but no secret."""
    log_format, start_logging = captured_log
    settings = secret_settings(sqlite_url, tmp_path, log_format)
    log = start_logging(settings)
    service: Service = await service_factory(settings, failing_upstream())
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="pending")
    token = sign(task.id, settings.signing_secret)

    async def broken_insert(*_: Any, **__: Any) -> None:
        raise RuntimeError(FAULT)

    monkeypatch.setattr(repository, "insert_delivery", broken_insert)
    # As a server would: the exception becomes a 500, not a crash of the client.
    transport = httpx.ASGITransport(app=service.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://imagetasks.test") as client:
        response = await client.post(
            f"/webhooks/starmagic/{task.id}/{token}",
            content=dumps(task_body("processing", upstream_id=task.upstream_task_id, progress=40)),
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 500
    text = await log.wait_for(FAULT)
    assert "Traceback" in text or '"exception"' in text
    assert_no_secret(text, secret_values(settings, token), log_format)


@pytest.mark.asyncio(loop_scope="session")
async def test_secrets_leaked_into_logs_when_a_worker_job_fails_unexpectedly(
    captured_log: tuple[str, Callable[[Settings], CapturedLog]],
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """A background job whose provider call blows up logs the traceback, but no secret."""
    log_format, start_logging = captured_log
    settings = secret_settings(sqlite_url, tmp_path, log_format)
    log = start_logging(settings)
    service: Service = await service_factory(settings, failing_upstream())
    async with service.runtime.sessions() as session:
        task = await make_task(
            session, status="processing", next_poll_at=utcnow() - timedelta(seconds=5)
        )
    worker = BackgroundWorker(service.runtime)
    await worker.start()
    try:
        text = await log.wait_for(FAULT)
    finally:
        await worker.stop()
    assert "Traceback" in text or '"exception"' in text
    assert_no_secret(
        text, secret_values(settings, sign(task.id, settings.signing_secret)), log_format
    )


def test_settings_repr_leaked_secrets(tmp_path: Path) -> None:
    """repr(), str() and rich's pretty repr of the settings show no secret, and say it is set."""
    from rich.pretty import pretty_repr

    settings = secret_settings(
        "postgresql+asyncpg://imagetasks:dbpass-canary-0f1e2d3c4b5a@db.internal/app",
        tmp_path,
        "json",
    )
    values = [*secret_values(settings), "dbpass-canary-0f1e2d3c4b5a"]
    for rendered in (repr(settings), str(settings), pretty_repr(settings), f"{settings!r}"):
        assert_no_secret(rendered, values, "settings repr")
        assert "webhook_secret='***'" in rendered
    # The values themselves are intact for the code that uses them.
    assert settings.signing_secret.startswith("whsec-canary-")
    assert settings.database_url.endswith(":dbpass-canary-0f1e2d3c4b5a@db.internal/app")
