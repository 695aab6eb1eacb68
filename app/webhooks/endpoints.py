"""Callers' webhook subscriptions: standing endpoints, per-task URLs, their secrets,
redelivery and recovery. Every bad input is a 422 naming its field, before any write."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.errors import Conflict, NotFound, Unprocessable
from app.ids import ulid
from app.models import utcnow
from app.netguard import Resolver
from app.services.events import SETTLED_EVENTS, TASK_EVENTS
from app.webhooks import repository, signing
from app.webhooks.policy import PolicyError, WebhookPolicy
from app.webhooks.schemas import EndpointCreate, EndpointPublic, EndpointUpdate

_KNOWN = tuple(kind.value for kind in TASK_EVENTS)
# Replaced secrets that keep signing through their grace period, at most (newest kept).
MAX_PREVIOUS_SECRETS = 3


def _invalid(field: str, reason: str) -> Unprocessable:
    return Unprocessable(f"{field}: {reason}", details=[{"field": field, "reason": reason}])


# C0 controls and DEL: PostgreSQL refuses NUL in text, and none belongs in these fields.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_PROSE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, CR, LF are fine


def plain_text(value: str | None, field: str, *, prose: bool = False) -> str | None:
    """The value if it holds no control characters (NUL included); 422 naming `field`."""
    if value is not None and (_CONTROL_IN_PROSE if prose else _CONTROL).search(value):
        raise _invalid(field, "must not contain NUL or other control characters")
    return value


def event_types(value: Sequence[str] | None, field: str) -> list[str]:
    """The chosen event types (default: the settled ones); 422 naming `field` on an unknown one."""
    if value is None:
        return [kind.value for kind in SETTLED_EVENTS]
    types = list(dict.fromkeys(value))
    if not types:
        raise _invalid(field, "choose at least one event type")
    for kind in types:
        plain_text(kind, field)
        if kind not in _KNOWN:
            raise _invalid(field, f"unknown event type {kind!r} (known: {', '.join(_KNOWN)})")
    return types


async def checked_url(
    policy: WebhookPolicy, url: str, field: str, resolver: Resolver | None = None
) -> str:
    """The URL if webhooks may go there (WEBHOOK_ALLOWED_NETWORKS); 422 naming `field`."""
    try:
        await policy.check(url, resolver)
    except PolicyError as exc:
        raise _invalid(field, str(exc)) from None
    return url


def public(row: Row[Any]) -> EndpointPublic:
    """An endpoint row as the API shows it."""
    return EndpointPublic(
        id=row.id,
        url=row.url,
        event_types=repository.parse_type_list(row.event_types),
        description=row.description,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        failing_since=row.failing_since,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class Endpoints:
    """The endpoint operations of one process."""

    def __init__(
        self, engine: AsyncEngine, settings: Settings, resolver: Resolver | None = None
    ) -> None:
        self._engine = engine
        self._settings = settings
        self.policy = WebhookPolicy.from_entries(settings.webhook_allowed_networks)
        self._resolver = resolver

    async def check_url(self, url: str, field: str) -> str:
        """See `checked_url`, with this process's policy."""
        return await checked_url(self.policy, url, field, self._resolver)

    async def create(self, owner: str, body: EndpointCreate) -> tuple[EndpointPublic, str]:
        """A new endpoint and its secret."""
        plain_text(body.url, "url")
        plain_text(body.description, "description", prose=True)
        types = event_types(body.event_types, "event_types")
        await self.check_url(body.url, "url")
        now = utcnow()
        values = {
            "id": "we_" + ulid(),
            "owner": owner,
            "url": body.url,
            "event_types": repository.type_list(types),
            "description": body.description,
            "enabled": body.enabled,
            "disabled_reason": None if body.enabled else "caller",
            "secret": signing.new_secret(),
            "created_at": now,
            "updated_at": now,
        }
        cap = self._settings.webhook_max_endpoints
        async with self._engine.begin() as db:
            if await repository.count_endpoints(db, owner) >= cap:
                raise Conflict(
                    f"this token already has {cap} webhook endpoints (WEBHOOK_MAX_ENDPOINTS); "
                    "delete one first",
                    code="too_many_endpoints",
                )
            await repository.insert_endpoint(db, values)
            row = await repository.get_endpoint(db, owner, str(values["id"]))
        assert row is not None
        return public(row), str(values["secret"])

    async def list(self, owner: str) -> list[EndpointPublic]:
        """The owner's endpoints."""
        async with self._engine.connect() as db:
            return [public(row) for row in await repository.list_endpoints(db, owner)]

    async def _row(self, owner: str, endpoint_id: str) -> Row[Any]:
        async with self._engine.connect() as db:
            row = await repository.get_endpoint(db, owner, endpoint_id)
        if row is None:
            raise NotFound(f"webhook endpoint {endpoint_id[:64]!r} does not exist")
        return row

    async def get(self, owner: str, endpoint_id: str) -> EndpointPublic:
        """One of the owner's endpoints (404 for anyone else's)."""
        return public(await self._row(owner, endpoint_id))

    async def update(self, owner: str, endpoint_id: str, body: EndpointUpdate) -> EndpointPublic:
        """Change the fields given; re-enabling clears the failure streak."""
        plain_text(body.url, "url")
        plain_text(body.description, "description", prose=True)
        await self._row(owner, endpoint_id)
        now = utcnow()
        values: dict[str, Any] = {"updated_at": now}
        if body.url is not None:
            values["url"] = await self.check_url(body.url, "url")
        if body.event_types is not None:
            values["event_types"] = repository.type_list(
                event_types(body.event_types, "event_types")
            )
        if "description" in body.model_fields_set:
            values["description"] = body.description
        if body.enabled is not None:
            values["enabled"] = body.enabled
            values["disabled_reason"] = None if body.enabled else "caller"
            if body.enabled:
                values["failing_since"] = None
        async with self._engine.begin() as db:
            if not await repository.update_endpoint(db, owner, endpoint_id, values):
                raise NotFound(f"webhook endpoint {endpoint_id[:64]!r} does not exist")
            if body.enabled is False:
                await repository.fail_pending(
                    db,
                    now,
                    "endpoint disabled (caller)",
                    repository.DELIVERIES.c.target == endpoint_id,
                )
            row = await repository.get_endpoint(db, owner, endpoint_id)
        assert row is not None
        return public(row)

    async def delete(self, owner: str, endpoint_id: str) -> None:
        """Remove an endpoint; its queued deliveries fail, its history stays."""
        async with self._engine.begin() as db:
            if not await repository.delete_endpoint(db, owner, endpoint_id, utcnow()):
                raise NotFound(f"webhook endpoint {endpoint_id[:64]!r} does not exist")

    async def secret(self, owner: str, endpoint_id: str) -> str:
        """The endpoint's current signing secret."""
        return str((await self._row(owner, endpoint_id)).secret)

    async def rotate(self, owner: str, endpoint_id: str) -> str:
        """A new secret; each replaced one keeps signing too for WEBHOOK_SECRET_GRACE_SECONDS
        (the newest MAX_PREVIOUS_SECRETS of them)."""
        now = utcnow()
        fresh = signing.new_secret()
        grace = timedelta(seconds=self._settings.webhook_secret_grace_seconds)
        # One transaction under the endpoint's lock: two rotations at once both keep
        # what the other replaced, and neither drops a secret still in its grace period.
        async with self._engine.begin() as db:
            await repository.lock_endpoint(db, endpoint_id)
            row = await repository.get_endpoint(db, owner, endpoint_id)
            if row is None:
                raise NotFound(f"webhook endpoint {endpoint_id[:64]!r} does not exist")
            replaced = [{"secret": row.secret, "until": (now + grace).isoformat()}] if grace else []
            kept = [
                entry
                for entry in row.previous_secrets or []
                if datetime.fromisoformat(entry["until"]) > now
            ]
            values = {
                "secret": fresh,
                "previous_secrets": (replaced + kept)[:MAX_PREVIOUS_SECRETS] or None,
                "updated_at": now,
            }
            await repository.update_endpoint(db, owner, endpoint_id, values)
        return fresh

    def default_secret(self, owner: str) -> str:
        """The token's secret for per-task webhook_urls."""
        return signing.default_secret(self._settings.signing_secret, owner)

    async def recover(
        self, owner: str, endpoint_id: str, since: datetime, until: datetime | None
    ) -> int:
        """Queue again what failed for this endpoint in the window; how many."""
        row = await self._row(owner, endpoint_id)
        if not row.enabled:
            raise Conflict(
                "the endpoint is disabled; enable it (PATCH enabled=true) first",
                code="endpoint_disabled",
            )
        now = utcnow()
        end = until or now
        if end <= since:
            raise _invalid("until", "must be after since")
        async with self._engine.begin() as db:
            return await repository.recover(db, endpoint_id, since=since, until=end, now=now)

    async def redeliver(self, owner: str, event_id: str) -> int:
        """Send one of the owner's events again to its targets; how many deliveries."""
        async with self._engine.begin() as db:
            event = await repository.event_row(db, event_id, owner)
            if event is None or event.type not in _KNOWN:
                raise NotFound(f"event {event_id[:64]!r} does not exist")
            return await repository.redeliver(
                db,
                event_id=event.id,
                kind=event.type,
                task_id=event.task_id,
                owner=owner,
                now=utcnow(),
            )
