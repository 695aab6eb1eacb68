"""Sending one claimed delivery: sign, POST once, record the attempt and what follows.

A delivery holds its lease for one attempt only, and an attempt is bounded by
WEBHOOK_TIMEOUT_SECONDS, so the lease (longer than that) needs no heartbeat: a
killed replica's delivery is taken over once its lease runs out, and a result
is recorded only while the lease is still ours (fencing).
"""

from __future__ import annotations

import http.cookiejar
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import metrics
from app.config import Settings
from app.events.schemas import EventPublic
from app.fetch_errors import _retry_after as parse_retry_after
from app.models import utcnow
from app.netguard import GuardError, Resolver, SystemResolver, guarded_transport
from app.services import events
from app.task_view import absolute_urls
from app.webhooks import outbox, repository, signing
from app.webhooks.endpoints import public
from app.webhooks.outbox import DeliveryJob
from app.webhooks.policy import PolicyError, WebhookPolicy
from app.webhooks.repository import DELIVERED, FAILED, PENDING, TASK_TARGET

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 20_000
# A Retry-After is believed up to this long (the schedule's own longest wait).
MAX_RETRY_AFTER_SECONDS = 36_000.0
_RESPECTS_RETRY_AFTER = frozenset({429, 503})


def lease_for(timeout_seconds: float) -> timedelta:
    """Longer than one bounded attempt and the writes around it."""
    return timedelta(seconds=timeout_seconds + 15)


def webhook_body(
    event_id: str, kind: str, created_at: datetime, data: dict[str, Any], base: str
) -> bytes:
    """The event as JSON, image URLs absolute, always under MAX_BODY_BYTES.

    A body that would pass it is shortened in this order, each step marked in `data`:
    the reference inputs go (`image_urls`, `mask_url`: `inputs_truncated`), then the
    prompt is cut (`prompt_truncated`), and last the task shrinks to its id, status and
    settled flag (`truncated`): the receiver reads the rest with GET /tasks/{id}.
    """
    shown = absolute_urls(data, base) if "images" in data else data
    event = EventPublic(id=event_id, type=kind, created_at=created_at, data=shown).model_dump(
        mode="json"
    )
    body = _dumps(event)
    if len(body) < MAX_BODY_BYTES:
        return body
    full: dict[str, Any] = event["data"]
    if full.get("image_urls") or full.get("mask_url"):
        event["data"] = {**full, "image_urls": None, "mask_url": None, "inputs_truncated": True}
        body = _dumps(event)
        if len(body) < MAX_BODY_BYTES:
            return body
    prompt = event["data"].get("prompt")
    if isinstance(prompt, str):
        excess = len(body) - MAX_BODY_BYTES + 64
        encoded = prompt.encode()
        cut = encoded[: max(0, len(encoded) - excess)].decode(errors="ignore")
        event["data"] = {**event["data"], "prompt": cut, "prompt_truncated": True}
        body = _dumps(event)
        if len(body) < MAX_BODY_BYTES:
            return body
    # Whatever else is large (metadata, errors): a few short fields, well under the limit.
    kept = ("id", "status", "settled", "image_index")
    event["data"] = {key: full[key] for key in kept if key in full} | {"truncated": True}
    return _dumps(event)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def next_delay(
    delays: Sequence[float], attempts_made: int, retry_after: float | None = None
) -> float | None:
    """Seconds until the next attempt, after `attempts_made` failed ones (None: give up).

    A receiver's Retry-After (429/503) is honoured when it asks for longer.
    """
    if attempts_made >= len(delays):
        return None
    delay = delays[attempts_made]
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay


@dataclass(frozen=True)
class Outcome:
    """What one attempt got."""

    status_code: int | None
    duration_ms: int
    error: str | None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def gone(self) -> bool:
        return self.status_code == 410


def judge(status_code: int, retry_after: str | None) -> tuple[str | None, float | None]:
    """The error an answer means (None: delivered), and the Retry-After to honour."""
    if 200 <= status_code < 300:
        return None, None
    if 300 <= status_code < 400:
        return f"answered {status_code}: redirects are not followed", None
    wait = parse_retry_after(retry_after) if status_code in _RESPECTS_RETRY_AFTER else None
    return f"answered {status_code}", wait


class _NoCookies(http.cookiejar.CookieJar):
    """A jar that keeps nothing: a receiver's Set-Cookie is neither sent back nor stored."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class Sender:
    """POSTs signed bodies through the address guard, one client per scheme."""

    def __init__(
        self, policy: WebhookPolicy, timeout: float, resolver: Resolver | None = None
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        resolver = resolver or SystemResolver()
        self._clients = {scheme: self._client(scheme, resolver) for scheme in ("https", "http")}

    def _client(self, scheme: str, resolver: Resolver) -> httpx.AsyncClient:
        def allowed(host: str, address: str) -> bool:
            return self.policy.may_connect(scheme, host, address)

        transport = guarded_transport(
            resolver,
            allow_private=False,
            ssl_context=httpx.create_ssl_context(),
            policy=allowed,
        )
        return httpx.AsyncClient(
            transport=transport,
            timeout=self.timeout,
            follow_redirects=False,
            trust_env=False,
            cookies=_NoCookies(),
            headers={"User-Agent": "imagetasks-webhooks"},
        )

    async def aclose(self) -> None:
        """Close both clients."""
        for client in self._clients.values():
            await client.aclose()

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> Outcome:
        """One POST, bounded in time; never raises for the receiver's faults."""
        started = time.monotonic()

        def took() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            parsed = self.policy.parse(url)
            with anyio.fail_after(self.timeout):
                # Nothing but our own headers: no cookies, no credentials.
                request = self._clients[parsed.scheme].build_request(
                    "POST", parsed, content=body, headers=headers
                )
                request.headers.pop("cookie", None)
                response = await self._clients[parsed.scheme].send(request, stream=True)
                await response.aclose()  # the answer's body is never read
        except PolicyError as exc:
            return Outcome(None, took(), f"refused: {exc}")
        except GuardError as exc:
            return Outcome(None, took(), f"refused: {exc}")
        except TimeoutError:
            return Outcome(None, took(), f"no answer within {self.timeout:g} s")
        except httpx.TimeoutException:
            return Outcome(None, took(), f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return Outcome(None, took(), f"{type(exc).__name__}: {exc}"[:300])
        error, wait = judge(response.status_code, response.headers.get("retry-after"))
        return Outcome(response.status_code, took(), error, wait)


class Deliverer:
    """Runs claimed deliveries for one worker."""

    def __init__(self, engine: AsyncEngine, settings: Settings, sender: Sender) -> None:
        self._engine = engine
        self._settings = settings
        self.sender = sender
        self.lease = lease_for(settings.webhook_timeout_seconds)

    def _secrets(self, job: DeliveryJob) -> list[str]:
        if job.target == TASK_TARGET:
            return signing.default_secrets(self._settings.webhook_secret, job.owner)
        return list(job.secrets)

    async def run(self, job: DeliveryJob) -> None:
        """Send and record one delivery; failures are recorded, never raised."""
        try:
            await self._run(job)
        except Exception:
            log.exception("webhook_delivery_crashed", delivery_id=job.id, event_id=job.event_id)

    async def _run(self, job: DeliveryJob) -> None:
        if job.url is None:
            gone = (
                "the task's webhook_url is gone (none, or it answered 410 Gone)"
                if job.target == TASK_TARGET
                else "endpoint disabled"
            )
            async with self._engine.begin() as db:
                await outbox.finish(
                    db, job, {"status": FAILED, "last_error": gone, "next_attempt_at": None}
                )
            return
        body = webhook_body(
            job.event_id,
            job.event_type,
            job.event_created_at,
            job.data,
            self._settings.public_base_url,
        )
        headers = signing.headers(self._secrets(job), job.event_id, int(time.time()), body)
        attempted_at = utcnow()
        outcome = await self.sender.send(job.url, headers, body)
        await self._record(job, attempted_at, outcome)

    async def _record(self, job: DeliveryJob, attempted_at: datetime, outcome: Outcome) -> None:
        now = utcnow()
        values: dict[str, Any] = {
            "last_status_code": outcome.status_code,
            "last_error": outcome.error,
            "updated_at": now,
        }
        if outcome.ok:
            values.update(status=DELIVERED, delivered_at=now, next_attempt_at=None)
            result = "delivered"
        elif outcome.gone:
            values.update(status=FAILED, next_attempt_at=None)
            result = "gone"
        else:
            delay = next_delay(self._settings.webhook_delays, job.attempts, outcome.retry_after)
            if delay is None:
                values.update(status=FAILED, next_attempt_at=None)
                result = "failed"
            else:
                values.update(status=PENDING, next_attempt_at=now + timedelta(seconds=delay))
                result = "retry"
        async with self._engine.begin() as db:
            if job.target != TASK_TARGET:
                # The endpoint's row before any delivery's: the order every writer keeps.
                await repository.lock_endpoint(db, job.target)
            await outbox.record_attempt(
                db,
                {
                    "delivery_id": job.id,
                    "attempted_at": attempted_at,
                    "status_code": outcome.status_code,
                    "duration_ms": outcome.duration_ms,
                    "error": outcome.error,
                },
            )
            if not await outbox.finish(db, job, values):
                log.warning("webhook_lease_lost", delivery_id=job.id, event_id=job.event_id)
                return
            await self._after(db, job, outcome, now)
        metrics.WEBHOOK_DELIVERIES.labels(outcome=result).inc()
        log.info(
            "webhook_attempted",
            event_id=job.event_id,
            task_id=job.task_id,
            target=job.target,
            attempt=job.attempts,
            status_code=outcome.status_code,
            outcome=result,
            error=outcome.error,
        )

    async def _after(
        self, db: AsyncConnection, job: DeliveryJob, outcome: Outcome, now: datetime
    ) -> None:
        """What the answer means for the target: 410 stops it, a long failure streak too."""
        if job.target == TASK_TARGET:
            if outcome.gone:
                await repository.mark_task_url_gone(db, job.task_id, now)
                await repository.fail_pending(
                    db,
                    now,
                    "the task's webhook_url answered 410 Gone",
                    repository.DELIVERIES.c.task_id == job.task_id,
                    repository.DELIVERIES.c.target == TASK_TARGET,
                )
            return
        if outcome.gone:
            await self._disable(db, job, "gone", now)
            return
        failing_since = await repository.note_endpoint_result(
            db, job.target, ok=outcome.ok, now=now
        )
        limit = timedelta(seconds=self._settings.webhook_disable_after_seconds)
        if failing_since is not None and now - failing_since >= limit:
            await self._disable(db, job, "failing", now)

    async def _disable(
        self, db: AsyncConnection, job: DeliveryJob, reason: str, now: datetime
    ) -> None:
        row = await repository.disable_endpoint(db, job.target, reason, now)
        if row is None:
            return
        data = public(row).model_dump(mode="json")
        await events.record_endpoint_disabled(db, data, owner=job.owner, now=now)
        metrics.WEBHOOK_ENDPOINTS_DISABLED.labels(reason=reason).inc()
        log.warning("webhook_endpoint_disabled", endpoint_id=job.target, reason=reason)
