"""`imagetasks worker` runs on the event loop `serve` gets: uvloop where installed."""

from __future__ import annotations

import asyncio
import sys

import pytest

from app import cli


def _loop_of_a_run() -> type[asyncio.AbstractEventLoop]:
    seen: list[type[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    cli.run_event_loop(main())
    return seen[0]


def test_the_worker_runs_on_uvloop_where_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert issubclass(_loop_of_a_run(), uvloop.Loop)


def test_without_uvloop_the_worker_runs_on_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    loop = _loop_of_a_run()
    assert loop.__module__.startswith("asyncio")
