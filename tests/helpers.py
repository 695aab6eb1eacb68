"""Plain helpers for tests: upstream doubles and snapshot bodies."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.schema_version import ROOT
from app.simulator import SimulatorConfig, create_simulator_app
from app.simulator.faults import Fault


def simulator_transport(**config: Any) -> tuple[httpx.ASGITransport, Any]:
    """The real simulator app as an in-process upstream (callbacks dropped)."""
    options: dict[str, Any] = {
        "api_key": "sim-key",
        "public_base_url": "http://starmagic.test",
        "time_scale": 0.01,
        "default_faults": Fault(drop=True),
    }
    options.update(config)
    app = create_simulator_app(SimulatorConfig(**options))
    return httpx.ASGITransport(app=app), app


def scripted_transport(
    handler: Callable[[httpx.Request], httpx.Response],
) -> httpx.MockTransport:
    """An upstream double for the narrow retry-rule tests."""
    return httpx.MockTransport(handler)


class GatedQueries(httpx.AsyncBaseTransport):
    """An upstream wrapper that counts task queries and can hold their answers.

    `hold()` makes the next queries wait, after the provider answered, until
    `release()`: the answer is fixed while the test acts. `unreachable` makes
    queries fail to connect.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self.queries: Counter[str] = Counter()
        self.held = asyncio.Event()  # set once a query's answer is being held
        self._open = asyncio.Event()
        self._open.set()
        self.unreachable = False

    def hold(self) -> None:
        """Hold the answers of the queries from now on."""
        self.held.clear()
        self._open.clear()

    def release(self) -> None:
        """Let held and later answers through."""
        self._open.set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" or not request.url.path.startswith("/v1/tasks/"):
            return await self._inner.handle_async_request(request)
        self.queries[request.url.path.rsplit("/", 1)[1]] += 1
        if self.unreachable:
            raise httpx.ConnectError("connection refused", request=request)
        response = await self._inner.handle_async_request(request)
        if not self._open.is_set():
            await response.aread()
            self.held.set()
            await self._open.wait()
        return response


def task_body(
    status: str,
    *,
    upstream_id: str = "task-unified-1757156493-imcg5zqt",
    progress: int | None = None,
    url: str | list[str] | None = "https://cdn.example.com/out.png",
    envelope: bool = True,
    published: bool = False,
    urls: list[str] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A provider task snapshot, in any of its shapes.

    `published` gives the provider's documented shape (a bare task object with
    `results: [url, …]`, no expiry); otherwise the enveloped `{"code", "data"}`
    shape (or its bare data object when `envelope` is false).
    """
    links = urls if urls is not None else ([] if url is None else [url])
    if published:
        body: dict[str, Any] = {
            "id": upstream_id,
            "object": "image.generation.task",
            "type": "image",
            "model": "gpt-image-1.5",
            "status": status,
            "progress": progress if progress is not None else 0,
            "created": 1757156493,
            "task_info": {"can_cancel": status in ("pending", "processing")},
        }
        if status == "completed":
            body["progress"] = 100
            body["results"] = links
        if error is not None:
            body["error"] = error
        return body
    data: dict[str, Any] = {"id": upstream_id, "status": status, "created": 1757156493}
    if progress is not None:
        data["progress"] = progress
    if status == "completed":
        data["progress"] = 100
        data["result"] = {"images": [{"url": link, "expires_at": 4102444800} for link in links]}
        data["completed"] = 1757156593
    if error is not None:
        data["error"] = error
    return {"code": 200, "data": data} if envelope else data


def dumps(body: Any) -> bytes:
    """JSON bytes for a raw request body."""
    return json.dumps(body).encode()


def _flip(token: str, index: int) -> str:
    """The token with one hex character changed."""
    swapped = "0" if token[index] != "0" else "1"
    return token[:index] + swapped + token[index + 1 :]


NEAR_MISS_KINDS = (
    "first_char_flipped",
    "middle_char_flipped",
    "last_char_flipped",
    "truncated_by_one",
    "truncated_to_half",
    "one_extra_char",
    "other_tasks_token",
    "rotated_out_secret",
)


def near_miss_token(kind: str, valid: str, *, other_task: str, retired: str) -> str:
    """A token that is almost the valid one; `other_task` and `retired` are valid elsewhere."""
    middle = len(valid) // 2 + 1  # in the second half: a half-length compare misses it
    return {
        "first_char_flipped": lambda: _flip(valid, 0),
        "middle_char_flipped": lambda: _flip(valid, middle),
        "last_char_flipped": lambda: _flip(valid, len(valid) - 1),
        "truncated_by_one": lambda: valid[:-1],
        "truncated_to_half": lambda: valid[: len(valid) // 2],
        "one_extra_char": lambda: valid + "0",
        "other_tasks_token": lambda: other_task,
        "rotated_out_secret": lambda: retired,
    }[kind]()


def break_applying(monkeypatch: Any, task_id: str, error: Exception) -> asyncio.Event:
    """Make the worker's apply of any answer about `task_id` raise `error`, whether
    alone (the state machine) or with others (the batch); the event is set once it did."""
    from app.services import reconcile, snapshot_batches

    failed = asyncio.Event()
    alone, together = reconcile.apply_snapshot, snapshot_batches.apply_snapshots

    async def apply_alone(db: Any, about: str, *args: Any, **kwargs: Any) -> Any:
        if about == task_id:
            failed.set()
            raise error
        return await alone(db, about, *args, **kwargs)

    async def apply_together(db: Any, snapshots: Any, **kwargs: Any) -> Any:
        if any(about == task_id for about, _ in snapshots):
            failed.set()
            raise error
        return await together(db, snapshots, **kwargs)

    monkeypatch.setattr(reconcile, "apply_snapshot", apply_alone)
    monkeypatch.setattr(reconcile.snapshot_batches, "apply_snapshots", apply_together)
    return failed


def offline_reconciler(factory: Any, settings: Any) -> Any:
    """A Reconciler whose provider client is never called (its answers are given)."""
    from app.services.reconcile import Reconciler
    from app.upstream import StarMagicClient

    client = StarMagicClient(None, base_url="http://unused", api_key="unused")  # type: ignore[arg-type]
    return Reconciler(factory, client, settings)


def alembic_config(url: str) -> Config:
    """The project's Alembic configuration, aimed at `url` (to migrate to a revision)."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    return config


T = TypeVar("T")


async def with_plan(
    engine: AsyncEngine, marker: str, act: Callable[[], Awaitable[T]]
) -> tuple[T, str]:
    """What `act` returns, and the database's plan (EXPLAIN) for the one statement it
    sent that contains `marker`."""
    sent: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        _, _, statement, parameters, _, _ = args
        if marker in statement:
            sent.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        result = await act()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    [(statement, parameters)] = sent
    explain = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    async with engine.connect() as db:
        rows = (await db.exec_driver_sql(explain + statement, parameters)).all()
    return result, "\n".join(str(row[-1]) for row in rows)
