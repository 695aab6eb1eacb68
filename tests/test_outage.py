"""Outages are logged as a story (started, a summary now and then, ended), not per failure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from app.cli import run_migrations
from app.events import bus as bus_module
from app.events.bus import EventBus
from app.models import utcnow
from app.outage import SCHEMA, UNREACHABLE, OutageLog
from app.runtime import Runtime
from app.worker import BackgroundWorker
from tests.conftest import LogLines, make_settings
from tests.factories import make_task
from tests.helpers import alembic_config
from tests.postgres import dsn, in_thread


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def outage_events(logs: LogLines) -> list[tuple[str, Any]]:
    """(event, failures) of every outage line so far."""
    return [
        (e["event"], e.get("failures")) for e in logs() if e["event"].startswith("database_outage")
    ]


def test_one_line_per_start_a_summary_per_period_one_per_end(capture_logs: LogLines) -> None:
    """Seventy failures a second apart give: started, two summaries with counts, ended."""
    clock = Clock()
    outage = OutageLog("database", summary_seconds=30, clock=clock)
    for _ in range(70):
        outage.failed(UNREACHABLE, "OSError: connection refused")
        clock.now += 1
    outage.recovered()  # too soon after the last failure: not over yet
    clock.now += 5
    outage.recovered()
    outage.recovered()  # healthy stays quiet
    assert outage_events(capture_logs) == [
        ("database_outage_started", None),
        ("database_outage_continues", 30),
        ("database_outage_continues", 30),
        ("database_outage_ended", 70),
    ]


def test_writes_failing_while_reads_succeed_are_one_story_not_a_flap(
    capture_logs: LogLines,
) -> None:
    """A full disk: each write fails and the loops' reads succeed between them. That is one
    outage (started, summaries), ended only once no failure came for a settling period."""
    clock = Clock()
    outage = OutageLog("database", summary_seconds=30, settle_seconds=5, clock=clock)
    for _ in range(40):
        outage.failed(UNREACHABLE, "OperationalError: database or disk is full")
        clock.now += 0.01
        outage.recovered()  # a loop's read, just after
        clock.now += 1.5
    assert outage_events(capture_logs) == [
        ("database_outage_started", None),
        ("database_outage_continues", 20),
    ]
    clock.now += 5
    outage.recovered()
    assert outage_events(capture_logs)[-1] == ("database_outage_ended", 40)


def test_a_schema_problem_is_logged_once_and_a_new_kind_starts_a_new_story(
    capture_logs: LogLines,
) -> None:
    """No periodic reminder for a missing schema; switching kinds ends one story, starts another."""
    clock = Clock()
    outage = OutageLog("database", summary_seconds=30, clock=clock)
    for _ in range(200):
        outage.failed(SCHEMA, "no schema: run `imagetasks migrate`", repeat=False)
        clock.now += 1
    outage.failed(UNREACHABLE, "OSError: connection refused")
    assert outage_events(capture_logs) == [
        ("database_outage_started", None),
        ("database_outage_ended", 200),
        ("database_outage_started", None),
    ]


@pytest.mark.asyncio(loop_scope="session")
async def test_worker_loops_log_an_unmigrated_database_once_then_its_recovery(
    tmp_path: Path, capture_logs: LogLines
) -> None:
    """Loops on an empty database log one line (no tracebacks), and one more once it is migrated."""
    empty = tmp_path / "empty.db"
    empty.touch()
    url = f"sqlite+aiosqlite:///{empty}"
    runtime = Runtime.build(make_settings(url, tmp_path, reconcile_interval_seconds=0.2))
    worker = BackgroundWorker(runtime, download_poll_seconds=0.2)
    await worker.start()
    try:
        await _until(lambda: len(outage_events(capture_logs)) >= 1)
        await asyncio.sleep(2.5)  # several failing rounds of every loop
        assert outage_events(capture_logs) == [("database_outage_started", None)]
        await asyncio.to_thread(in_thread, run_migrations, url)
        await _until(lambda: len(outage_events(capture_logs)) >= 2)
    finally:
        await worker.stop()
        await runtime.aclose()
    events = outage_events(capture_logs)
    assert [event for event, _ in events] == ["database_outage_started", "database_outage_ended"]
    assert events[1][1] >= 3
    assert not [
        e
        for e in capture_logs()
        if "exception" in e
        or (e["level"] == "error" and not e["event"].startswith("database_outage"))
    ]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_database_a_revision_behind_is_told_as_a_schema_problem(
    tmp_path: Path, capture_logs: LogLines
) -> None:
    """A database one revision behind lacks an index a claim names (SQLite: `no such
    index`): the loop says to migrate, not that the database is unreachable."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'behind.db'}"
    await asyncio.to_thread(in_thread, command.upgrade, alembic_config(url), "0010")
    runtime = Runtime.build(make_settings(url, tmp_path))
    async with runtime.sessions() as session:
        now = utcnow()
        await make_task(session, status="processing", next_poll_at=now, confirm_requested_at=now)
    worker = BackgroundWorker(runtime, download_poll_seconds=600)
    await worker.start()
    try:
        await _until(lambda: len(outage_events(capture_logs)) >= 1)
    finally:
        await worker.stop()
        await runtime.aclose()
    [started] = [e for e in capture_logs() if e["event"] == "database_outage_started"]
    assert started["kind"] == SCHEMA, started
    assert "imagetasks migrate" in started["reason"]


@pytest.mark.asyncio(loop_scope="session")
async def test_worker_loops_summarise_an_unreachable_database(
    tmp_path: Path, capture_logs: LogLines
) -> None:
    """A database nobody answers for: a start line and counted summaries, no traceback per round."""
    settings = make_settings(
        "postgresql+asyncpg://postgres@127.0.0.1:1/none", tmp_path, reconcile_interval_seconds=0.2
    )
    runtime = Runtime.build(settings)
    outage = OutageLog("database", summary_seconds=1.0)
    worker = BackgroundWorker(runtime, download_poll_seconds=0.2, database_outage=outage)
    await worker.start()
    try:
        await _until(lambda: len(outage_events(capture_logs)) >= 3)
    finally:
        await worker.stop()
        await runtime.aclose()
    events = outage_events(capture_logs)
    assert events[0] == ("database_outage_started", None)
    assert {event for event, _ in events[1:]} == {"database_outage_continues"}
    assert all(count >= 1 for _, count in events[1:])
    assert not [e for e in capture_logs() if "exception" in e]


async def _until(condition: Any, timeout: float = 60) -> None:
    """Poll until the condition holds (generous limit: the machine is shared)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="session")
async def test_the_event_listener_tells_its_outage_as_a_story(
    postgres_database: str, capture_logs: LogLines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty refused LISTEN connections: one start line, one end line, none per attempt."""
    real_connect = bus_module.asyncpg.connect
    attempts = 0

    async def refused_twenty_times(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts <= 20:
            raise ConnectionRefusedError(111, "Connection refused")
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(bus_module.asyncpg, "connect", refused_twenty_times)
    monkeypatch.setattr(bus_module, "MAX_RECONNECT_SECONDS", 0.01)
    bus = EventBus()
    listener = asyncio.create_task(bus._listen_forever(dsn(postgres_database)))
    try:
        await asyncio.wait_for(bus.listening.wait(), 60)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    listener_lines = [e for e in capture_logs() if e["event"].startswith("event_listener")]
    assert [(e["event"], e.get("failures")) for e in listener_lines] == [
        ("event_listener_outage_started", None),
        ("event_listener_outage_ended", 20),
        ("event_listener_connected", None),
    ]
