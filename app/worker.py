"""The background loops: downloads and the reconciler. They run inside the
API process by default, or alone in `imagetasks worker`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog

from app import activity, metrics, repository
from app.config import Settings
from app.events import repository as event_repository
from app.models import utcnow
from app.outage import SCHEMA, OutageLog, diagnose_database_error
from app.repository import DownloadJob
from app.runtime import Runtime
from app.services.downloads import LEASE, Downloader
from app.services.reconcile import CONFIRM_BATCH
from app.webhooks import outbox as webhook_outbox
from app.webhooks.delivery import Deliverer, Sender

log = structlog.get_logger(__name__)

DOWNLOAD_POLL_SECONDS = 1.0
# How often the worker looks for callbacks waiting to be confirmed: an API process
# with RUN_BACKGROUND=false leaves them due in the database for this loop.
CONFIRM_POLL_SECONDS = 0.25
# Every event rings the webhook loop, and most queue no webhook: a look at the outbox
# that found nothing more due is not repeated sooner than this, however many ring.
WEBHOOK_RECHECK_SECONDS = 0.01
STATS_SECONDS = 15.0
# A stop waits this long in all for the work under way: rounds, downloads, webhooks.
STOP_GRACE_SECONDS = 20.0
# A round under way gets this long to end at its next look at the stop, which its
# statements take (cancelled inside one, a connection can be left in its transaction:
# on SQLite, holding the write lock). Past it the round is waiting on the network (a
# provider query) or on a database that does not answer, where a cancel breaks nothing.
ROUND_GRACE_SECONDS = 2.0
# Retention: one pass an hour, in batches small enough to hold locks only briefly.
PRUNE_INTERVAL_SECONDS = 3600.0
PRUNE_BATCH_ROWS = 1000
PRUNE_PAUSE_SECONDS = 0.5


# What a loop waits on between rounds, given the seconds until its next.
Pause = Callable[[float], Awaitable[object]]


def worker_name() -> str:
    """Unique per process: the owner of the leases it takes."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(3)}"


# Renders waiting or running in one worker, past which a stored image's variants are
# left to their first request (made on demand): a backlog of renders must not hold
# spool copies and files open without bound.
RENDER_BACKLOG = 16
# Events after which a download is due at once.
_WAKES_DOWNLOADS = ("task.completed", "image.queued")


class BackgroundWorker:
    """Claims queued downloads and due polls until told to stop."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        download_poll_seconds: float = DOWNLOAD_POLL_SECONDS,
        prune_batch_rows: int = PRUNE_BATCH_ROWS,
        prune_pause_seconds: float = PRUNE_PAUSE_SECONDS,
        database_outage: OutageLog | None = None,
    ):
        self._runtime = runtime
        # Shared with the request path when given: one outage story per process.
        self.database_outage = database_outage or OutageLog("database")
        self._settings = runtime.settings
        self._poll_seconds = download_poll_seconds
        self._prune_batch = prune_batch_rows
        self._prune_pause = prune_pause_seconds
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._in_round: set[asyncio.Task[None]] = set()  # loops running a round now
        self.downloader = Downloader(
            runtime.engine,
            runtime.fetcher,
            runtime.storage,
            runtime.starmagic,
            worker_name(),
            max_image_bytes=runtime.settings.max_image_bytes,
        )
        self._running: dict[asyncio.Task[None], tuple[str, int]] = {}
        self._rendering: set[asyncio.Task[None]] = set()
        self.deliverer = Deliverer(
            runtime.engine,
            self._settings,
            Sender(runtime.webhooks.policy, self._settings.webhook_timeout_seconds),
        )
        self._sending: set[asyncio.Task[None]] = set()
        # A completed task or a retried image (in any process) wakes the download loop
        # before its next poll.
        self._completions = contextlib.ExitStack()
        self._completed = self._completions.enter_context(
            runtime.events.subscribe(lambda notice: notice.type in _WAKES_DOWNLOADS)
        )
        # Any event may have queued webhooks (in any process): look for them at once.
        self._written = self._completions.enter_context(runtime.events.subscribe(lambda _: True))

    async def start(self) -> None:
        """Clear a crashed run's temp files, then start the loops."""
        # Live jobs keep their spool files' mtime fresh; anything older is a crash's.
        removed = await self._runtime.storage.cleanup_spool(max(LEASE.total_seconds() * 8, 120))
        if removed:
            log.info("spool_cleaned", files=removed)
        sleep = asyncio.sleep
        loops: list[tuple[str, Callable[[], Awaitable[float | None]], float, Pause]] = [
            ("downloads", self._download_round, 0, self._completed.wait),
            ("reconciler", self._reconcile_round, self._settings.reconcile_interval_seconds, sleep),
            ("confirmations", self._confirm_round, CONFIRM_POLL_SECONDS, sleep),
            ("webhooks", self._webhook_round, 0, self._after_webhook_round),
            ("queue_stats", self._queue_stats, STATS_SECONDS, sleep),
            ("retention", self._prune, PRUNE_INTERVAL_SECONDS, sleep),
        ]
        self._loops = [
            asyncio.create_task(self._forever(name, round_, interval, pause), name=name)
            for name, round_, interval, pause in loops
        ]
        log.info("worker_started", owner=self.downloader.owner)

    async def stop(self) -> None:
        """Stop claiming, let the work under way finish (bounded), give back the leases."""
        clock = asyncio.get_running_loop()
        deadline = clock.time() + STOP_GRACE_SECONDS
        self._stopping.set()
        self._completions.close()
        # A pausing loop is cancelled at once; a round under way is given a moment.
        for loop in self._loops:
            if loop not in self._in_round:
                loop.cancel()
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=ROUND_GRACE_SECONDS)
            for loop in late:
                log.info("loop_cancelled_at_stop", loop=loop.get_name())
                loop.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
        # Confirmations under way share the grace too: closing the runtime after the
        # stop would otherwise wait for them once more.
        confirming = self._runtime.reconciler.under_way()
        running = [*self._running, *self._rendering, *self._sending, *confirming]
        if running:
            left = max(0.0, deadline - clock.time())
            _, pending = await asyncio.wait(running, timeout=left)
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.deliverer.sender.aclose()
        with contextlib.suppress(Exception):
            async with self._runtime.engine.begin() as db:
                released = await repository.release_download_leases(db, self.downloader.owner)
                released += await webhook_outbox.release_leases(db, self.downloader.owner)
            log.info("worker_stopped", owner=self.downloader.owner, released_leases=released)

    async def _forever(
        self,
        name: str,
        round_: Callable[[], Awaitable[float | None]],
        interval: float,
        pause: Pause,
    ) -> None:
        this = asyncio.current_task()
        assert this is not None
        while not self._stopping.is_set():
            self._in_round.add(this)
            try:
                wait = await round_()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._failed(exc, "loop_failed", loop=name)
                wait = max(interval, 1.0)
            else:
                self.database_outage.recovered()
            finally:
                self._in_round.discard(this)
            if self._stopping.is_set():
                # Stopped during the round (or a cancel past the stop's grace was
                # swallowed inside it, as a database driver can): never pause, possibly
                # for an hour, once stopping.
                return
            await pause(interval if wait is None else wait)

    async def _download_round(self) -> float:
        """Fill free slots with due downloads; come back at once while work remains."""
        slots = self._settings.download_concurrency
        if self._runtime.reconciler.behind:
            # Confirmations first: they settle what callers wait for, and a link lasts a
            # day. One download still runs, so none waits without end.
            slots = 1
        free = slots - len(self._running)
        if free <= 0:
            return self._poll_seconds / 4
        async with self._runtime.engine.begin() as db:
            jobs = await repository.claim_due_downloads(
                db,
                now=utcnow(),
                owner=self.downloader.owner,
                lease=self.downloader.lease,
                limit=free,
                running=list(self._running.values()),
            )
        if self._stopping.is_set():
            return 0.0  # claimed as the stop came: the stop gives the leases back
        for job in jobs:
            self._spawn(job)
        return 0.0 if len(jobs) == free else self._poll_seconds

    async def _webhook_round(self) -> float:
        """Send due webhooks in free slots; come back at once while work remains."""
        free = self._settings.webhook_concurrency - len(self._sending)
        if free <= 0 or self._stopping.is_set():
            return self._poll_seconds / 4
        async with self._runtime.engine.begin() as db:
            jobs = await webhook_outbox.claim_due(
                db,
                now=utcnow(),
                owner=self.downloader.owner,
                lease=self.deliverer.lease,
                limit=free,
            )
        if self._stopping.is_set():
            return 0.0  # claimed as the stop came: the stop gives the leases back
        for job in jobs:
            task = asyncio.create_task(self.deliverer.run(job))
            self._sending.add(task)
            # A finished delivery may unblock the next event of its task: look again.
            task.add_done_callback(self._sent)
        return 0.0 if len(jobs) == free else self._poll_seconds

    async def _after_webhook_round(self, seconds: float) -> bool:
        """Until the next look: at once while slots were all filled, else once rung (or
        `seconds` pass), but never sooner than WEBHOOK_RECHECK_SECONDS."""
        if seconds > 0:
            await asyncio.sleep(WEBHOOK_RECHECK_SECONDS)
        return await self._written.wait(seconds)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._written.ring(None)

    def _spawn(self, job: DownloadJob) -> None:
        task = asyncio.create_task(self._guarded_download(job))
        self._running[task] = (job.task_id, job.position)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)

    async def _guarded_download(self, job: DownloadJob) -> None:
        with structlog.contextvars.bound_contextvars(task_id=job.task_id):
            stored = await self.downloader.store(job)
            if stored is None:
                return
            # Stored and recorded: the download slot is free for the next image (whose
            # link may be expiring) while this one's variants wait for a render thread.
            job_task = asyncio.current_task()
            assert job_task is not None
            self._running.pop(job_task, None)
            self._completed.ring(None)
            if self._runtime.reconciler.behind:
                # The CPU is the confirmations'; a variant is made on its first request.
                deferred = "confirmations_behind"
            elif len(self._rendering) >= RENDER_BACKLOG:
                deferred = "render_backlog"
            else:
                deferred = None
            if deferred is not None:
                log.info("variants_deferred", key=stored, position=job.position, reason=deferred)
                return
            self._rendering.add(job_task)
            try:
                await self.downloader.render_variants(job, stored)
            finally:
                self._rendering.discard(job_task)

    async def _failed(self, exc: Exception, event: str, **context: object) -> None:
        """A database outage or missing schema joins the outage story; anything else is a bug."""
        diagnosis = await diagnose_database_error(self._runtime.engine, exc)
        if diagnosis is None:
            log.error(event, exc_info=exc, **context)
        else:
            repeat = diagnosis.kind != SCHEMA
            self.database_outage.failed(diagnosis.kind, diagnosis.reason, repeat=repeat)

    async def _reconcile_round(self) -> None:
        while await self._runtime.reconciler.run_once() and not self._stopping.is_set():
            pass

    async def _confirm_round(self) -> None:
        """Start batches of due confirmations until none is left or there is no room;
        their queries run on while the next batch starts (a slow one holds back nobody)."""
        while (
            await self._runtime.reconciler.start_confirmations(self._stopping.is_set)
            >= CONFIRM_BATCH
            and not self._stopping.is_set()
        ):
            pass

    async def _queue_stats(self) -> None:
        async with self._runtime.engine.connect() as db:
            depth, oldest = await repository.download_queue_stats(db)
        metrics.QUEUE_DEPTH.set(depth)
        metrics.QUEUE_OLDEST.set((utcnow() - oldest).total_seconds() if oldest else 0)

    async def _prune(self) -> None:
        """Delete callback deliveries, task activity, idempotency records, events and webhook
        deliveries past their retention."""
        now = utcnow()
        pruned = {
            "callback_deliveries": await self._prune_table(
                repository.prune_callback_deliveries,
                now - timedelta(days=self._settings.callback_retention_days),
            ),
            # The timeline's download attempts and queries live as long as the deliveries.
            "task_activity": await self._prune_table(
                activity.prune,
                now - timedelta(days=self._settings.callback_retention_days),
            ),
            "idempotency_records": await self._prune_table(
                repository.prune_idempotency_records,
                now - timedelta(days=self._settings.idempotency_retention_days),
            ),
            # Settled deliveries (and their attempts) first: an event goes only once no
            # delivery refers to it, and a pending one (still in its schedule) never goes.
            "webhook_deliveries": await self._prune_table(
                webhook_outbox.prune_deliveries,
                now - timedelta(days=self._settings.event_retention_days),
            ),
            "events": await self._prune_table(
                event_repository.prune_events,
                now - timedelta(days=self._settings.event_retention_days),
            ),
        }
        if any(pruned.values()):
            log.info("retention_pruned", **pruned)

    async def _prune_table(self, prune: repository.Pruner, before: datetime) -> int:
        """Batch after batch, each in its own short transaction, with a pause between."""
        total = 0
        while not self._stopping.is_set():
            async with self._runtime.engine.begin() as db:
                deleted = await prune(db, before=before, limit=self._prune_batch)
            total += deleted
            if deleted < self._prune_batch:
                break
            await asyncio.sleep(self._prune_pause)
        return total


async def run_worker(settings: Settings) -> None:
    """`imagetasks worker`: the loops alone, until SIGTERM or SIGINT."""
    runtime = Runtime.build(settings)
    await runtime.events.start(runtime.engine)
    worker = BackgroundWorker(runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await worker.start()
    try:
        await stop.wait()
    finally:
        log.info("worker_stopping")
        await worker.stop()
        await runtime.aclose()
