"""In-memory state of one simulator: tasks, image links, counters and background work.

Background work (task timelines, callback deliveries) and the outgoing
httpx client start lazily on first use, so the app also works mounted inside
another app, whose lifespan never runs the simulator's own. Whoever owns the
event loop calls ``aclose()`` at shutdown: the simulator's lifespan does it
when it runs alone; a parent app should do it in its own lifespan.

Every mutation runs without an ``await`` between reading and writing, so it is
atomic on the event loop; the lock only serialises reset and shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from app.simulator.config import SimulatorConfig
from app.simulator.faults import Fault
from app.simulator.validation import Submission

Status = Literal["pending", "processing", "completed", "failed", "cancelled"]
TERMINAL: tuple[Status, ...] = ("completed", "failed", "cancelled")


@dataclass
class CallbackAttempt:
    """One HTTP attempt at delivering a callback."""

    delivery: int  # 1-based, counts deliveries (duplicates, stale, manual) of the task
    kind: str  # terminal | late_processing | manual
    attempt: int  # 1 for the first try, up to 1 + len(retry_delays)
    url: str
    started_at: float  # Unix time
    status_code: int | None
    error: str | None  # exception class name on timeout or connection failure
    latency_ms: float

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass
class Link:
    """One image URL handed out for a completed task."""

    name: str
    task_id: str
    index: int  # which of the task's images, from 0
    url: str
    expires_at: int
    revoked: bool = False
    refusals: int = 0
    gets: int = 0

    def expired(self, now: float) -> bool:
        """True when the link must answer 403."""
        return self.revoked or now >= self.expires_at

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return asdict(self)


@dataclass
class SimTask:
    """A simulated provider task."""

    id: str
    submission: Submission
    faults: Fault
    eta: int
    created: int
    started: float = field(default_factory=time.monotonic)
    status: Status = "pending"
    progress: int = 0
    completed: int | None = None
    actual_time: int | None = None
    error: dict[str, Any] | None = None
    links: list[Link] = field(default_factory=list)
    attempts: list[CallbackAttempt] = field(default_factory=list)
    deliveries: int = 0
    queries: int = 0
    image_gets: int = 0
    served_503: int = 0
    # Each image rendered once, off the event loop; every GET of that image awaits the same work.
    pngs: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    timeline: asyncio.Task[None] | None = None

    @property
    def terminal(self) -> bool:
        """True once completed, failed or cancelled."""
        return self.status in TERMINAL

    @property
    def current_links(self) -> list[Link]:
        """The newest link of each image, in image order; empty before completion."""
        newest: dict[int, Link] = {}
        for link in self.links:
            newest[link.index] = link
        return [newest[index] for index in sorted(newest)]

    def to_dict(self) -> dict[str, Any]:
        """The inspection view served by ``GET /_sim/tasks/{id}``."""
        return {
            "id": self.id,
            "status": self.status,
            "progress": self.progress,
            "request": asdict(self.submission),
            "faults": self.faults.to_dict(),
            "estimated_time": self.eta,
            "created": self.created,
            "completed": self.completed,
            "actual_time": self.actual_time,
            "error": self.error,
            "output_size": [self.submission.width, self.submission.height],
            "links": [link.to_dict() for link in self.links],
            "callback_attempts": [asdict(attempt) for attempt in self.attempts],
            "queries": self.queries,
            "image_gets": self.image_gets,
        }


class SimulatorState:
    """Everything one simulator instance knows; lives on ``app.state.simulator``."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults = config.default_faults
        self.tasks: dict[str, SimTask] = {}
        self.links: dict[str, Link] = {}
        self.counters: Counter[str] = Counter()
        self._client: httpx.AsyncClient | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._senders: set[asyncio.Task[None]] = set()  # terminal callbacks being sent
        self._lock = asyncio.Lock()

    @property
    def client(self) -> httpx.AsyncClient:
        """The callback sender's client, created on first use."""
        if self._client is None:
            # trust_env off: callbacks must go straight to their URL, never through a proxy.
            self._client = httpx.AsyncClient(
                timeout=self.config.callback_timeout, follow_redirects=False, trust_env=False
            )
        return self._client

    @property
    def idle(self) -> bool:
        """True when no background work runs and no client is open (e.g. after ``aclose``)."""
        return self._client is None and not self._background

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def spawn_callbacks(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """`spawn` a task's terminal callbacks, counted in stats until the last retry ends."""
        task = self.spawn(work)
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)
        return task

    async def _cancel_background(self) -> None:
        pending = list(self._background)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def reset(self) -> None:
        """Forget every task, link and counter, and restore the configured faults."""
        async with self._lock:
            await self._cancel_background()
            self.tasks.clear()
            self.links.clear()
            self.counters.clear()
            self.faults = self.config.default_faults

    async def aclose(self) -> None:
        """Stop background work and close the client; safe to call twice."""
        async with self._lock:
            await self._cancel_background()
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    def stats(self) -> dict[str, Any]:
        """Counters served by ``GET /_sim/stats``."""
        return {
            **{
                name: self.counters[name]
                for name in (
                    "submit_requests",
                    "submits",
                    "rejected_submits",
                    "queries",
                    "image_gets",
                    "callback_attempts",
                    "completed",
                    "failed",
                    "cancelled",
                    "cancel_requests",
                )
            },
            "tasks": len(self.tasks),
            # Tasks whose terminal callbacks (duplicates and retries included) are not all
            # sent yet: a test counting deliveries waits for none.
            "callbacks_pending": len(self._senders),
            "queries_per_task": {task.id: task.queries for task in self.tasks.values()},
            "image_gets_per_task": {task.id: task.image_gets for task in self.tasks.values()},
            "image_gets_per_link": {name: link.gets for name, link in self.links.items()},
        }
