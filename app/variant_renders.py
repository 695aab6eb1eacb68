"""Variants made on request, when a client asks for one that was never stored.

One render of a large original holds hundreds of megabytes and seconds of CPU, so a
process renders at most `slots` at once, concurrent requests for the same variant
share one render, and an original that cannot be rendered is remembered for a while
(a corrupt object answers at once instead of being decoded again on every request).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from app import variants
from app.storage import Storage

RENDER_SLOTS = 2
FAILURE_SECONDS = 600.0
REMEMBERED_FAILURES = 1024


class OnDemandRenders:
    """The process's on-demand variant renders: bounded, coalesced, failures remembered."""

    def __init__(
        self, *, slots: int = RENDER_SLOTS, failure_seconds: float = FAILURE_SECONDS
    ) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._failure_seconds = failure_seconds
        self._running: dict[str, asyncio.Task[bytes]] = {}
        self._failures: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def make(self, storage: Storage, key: str, variant: str, *, max_bytes: int) -> bytes:
        """The variant's bytes, rendered and stored now; VariantError if it cannot be.

        Storage errors pass through and are not remembered (an outage is not the
        image's fault)."""
        target = variants.variant_key(key, variant)
        failed = self._failures.get(target)
        if failed is not None:
            if failed[0] > time.monotonic():
                raise variants.VariantError(failed[1])
            del self._failures[target]
        running = self._running.get(target)
        if running is None:
            running = asyncio.create_task(self._render(storage, key, variant, max_bytes))
            self._running[target] = running
            running.add_done_callback(lambda done: self._finished(target, done))
        # Shielded: a client that goes away does not cancel the others' render.
        return await asyncio.shield(running)

    async def _render(self, storage: Storage, key: str, variant: str, max_bytes: int) -> bytes:
        async with self._slots:
            made = await variants.make_variants(storage, key, names=[variant], max_bytes=max_bytes)
        return made[variant]

    def _finished(self, target: str, done: asyncio.Task[bytes]) -> None:
        self._running.pop(target, None)
        if done.cancelled():
            return
        error = done.exception()  # also marks it retrieved when every waiter left
        if isinstance(error, variants.VariantError):
            self._failures[target] = (time.monotonic() + self._failure_seconds, str(error))
            while len(self._failures) > REMEMBERED_FAILURES:
                self._failures.popitem(last=False)
