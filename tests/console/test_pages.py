"""The console's pages in-process: gallery and its filters, one task's page, the
retry action, the overview and the static files."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app import activity, repository
from app.console.hooks import NotificationView
from app.console.pages import assets
from app.models import Image, utcnow
from tests.conftest import Service, make_settings
from tests.console.helpers import console_client, csrf_from, sign_in, stored_task
from tests.factories import make_image, make_task
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")
CARD = re.compile(r'data-task-id="([^"]+)"')


async def _service(service_factory: Any, url: str, tmp_path: Path, **settings: Any) -> Service:
    built: Service = await service_factory(
        make_settings(url, tmp_path, **settings), simulator_transport()[0]
    )
    return built


async def test_the_gallery_shows_thumbnails_badges_and_failure_reasons(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Newest first; a stored task links its thumb, a failed one shows its reason."""
    service = await _service(service_factory, database_url, tmp_path)
    stored = await stored_task(service, tmp_path, prompt="a lighthouse at dusk")
    async with service.runtime.sessions() as session:
        failed = await make_task(
            session,
            status="failed",
            error_code="content_policy_violation",
            error_message="the prompt was refused",
        )
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get("/console")
        assert page.status_code == 200
        assert CARD.findall(page.text) == [failed.id, stored.id]
        assert f'src="/console/tasks/{stored.id}/image?variant=thumb"' in page.text
        assert "content_policy_violation" in page.text
        assert "the prompt was refused" in page.text
        thumb = await client.get(f"/console/tasks/{stored.id}/image?variant=thumb")
        assert thumb.status_code == 200
        assert thumb.headers["content-type"] == "image/webp"


async def test_gallery_filters_narrow_the_listing(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Status, image status, metadata key=value, prompt text and time range all apply."""
    service = await _service(service_factory, database_url, tmp_path)
    now = utcnow()
    async with service.runtime.sessions() as session:
        fox = await make_task(
            session, prompt="A Red Fox in snow", meta={"order_id": "A-1"}, status="pending"
        )
        owl = await make_task(
            session,
            prompt="an owl",
            meta={"order_id": "B-2"},
            status="completed",
            image_status="failed",
            created_at=now - timedelta(days=2),
        )

    async def listed(query: str) -> list[str]:
        response = await client.get(f"/console?{query}")
        assert response.status_code == 200, response.text
        return CARD.findall(response.text)

    async with console_client(service) as client:
        await sign_in(client)
        assert await listed("status=pending") == [fox.id]
        assert await listed("image_status=failed") == [owl.id]
        assert await listed("meta=order_id%3DB-2") == [owl.id]
        assert await listed("q=red+fox") == [fox.id]
        assert await listed("q=100%25") == []
        yesterday = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
        assert await listed(f"created_after={yesterday}") == [fox.id]
        assert await listed(f"created_before={yesterday}") == [owl.id]


async def test_bad_filters_are_named_and_nothing_is_listed(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """422 with each bad field's reason; no cards."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with service.runtime.sessions() as session:
        await make_task(session)
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get("/console?status=lost&meta=nokey&created_after=yesterday")
        assert page.status_code == 422
        assert "unknown status &#39;lost&#39;" in page.text
        assert "write key=value" in page.text
        assert "not a date and time" in page.text
        assert CARD.findall(page.text) == []


async def test_scrolling_pages_through_the_cursor(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The first page links the next; /console/cards follows cursors to the end, no repeats."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    now = utcnow()
    async with service.runtime.sessions() as session:
        made = [
            (await make_task(session, created_at=now - timedelta(seconds=i))).id for i in range(30)
        ]
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get("/console")
        seen = CARD.findall(page.text)
        cursor = re.search(r'data-cursor="([^"]+)"', page.text)
        assert cursor is not None
        more = await client.get(f"/console/cards?cursor={cursor.group(1)}")
        seen += CARD.findall(more.text)
        assert more.headers["x-next-cursor"] == ""
        assert seen == made
        bad = await client.get("/console/cards?cursor=forged")
        assert bad.status_code == 422
        forged = await client.get("/console?cursor=forged")
        assert forged.status_code == 422
        assert "not a cursor this service issued" in forged.text


async def test_a_live_card_is_sent_only_when_the_task_matches(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """/console/cards/{id}: the card under the gallery's filters, or 204."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="processing", progress=40)
    async with console_client(service) as client:
        await sign_in(client)
        shown = await client.get(f"/console/cards/{task.id}?status=processing")
        assert CARD.findall(shown.text) == [task.id]
        assert "40%" in shown.text
        hidden = await client.get(f"/console/cards/{task.id}?status=completed")
        assert hidden.status_code == 204
        assert (await client.get("/console/cards/tsk_none")).status_code == 204


async def test_the_task_page_tells_the_story_in_time_order(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Prompt, parameters, metadata and provider id; callbacks, queries, downloads and the
    stored object, ordered by time whatever table they come from."""
    service = await _service(service_factory, database_url, tmp_path)
    task = await stored_task(service, tmp_path, meta={"order_id": "A-7"}, prompt="a quiet harbour")
    start = task.created_at
    async with service.runtime.engine.begin() as db:
        await repository.insert_delivery(
            db,
            {
                "task_id": task.id,
                "body_sha256": "0" * 64,
                "upstream_status": "completed",
                "outcome": "applied",
                "changed": True,
                "received_at": start + timedelta(seconds=2),
            },
        )
        await activity.note(
            db,
            task.id,
            activity.Kind.QUERY,
            "ok",
            at=start + timedelta(seconds=3),
            detail="confirmation: StarMagic says completed (applied)",
        )
        await activity.note(
            db,
            task.id,
            activity.Kind.DOWNLOAD,
            "retry",
            at=start + timedelta(seconds=1),
            position=0,
            detail="http_503: busy",
        )
    async with service.runtime.sessions() as session, session.begin():
        await session.execute(
            update(Image)
            .where(Image.task_id == task.id)  # type: ignore[arg-type]
            .values(stored_at=start + timedelta(seconds=4))
        )
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get(f"/console/tasks/{task.id}")
        assert page.status_code == 200
        text = page.text
        for fact in (
            "a quiet harbour",
            "gpt-image-1.5",
            '"order_id": "A-7"',
            task.upstream_task_id or "?",
            f'{task.id}/image" download',
        ):
            assert fact in text, fact
        titles = re.findall(r'<span class="what">([^<]+)</span>', text)
        assert titles == [
            "Submitted",
            "Download attempt (image 0): retry",
            "Callback received",
            "Query to StarMagic: ok",
            "Stored object (image 0)",
        ]
        assert "Authorization: Bearer $IMAGETASKS_TOKEN" in text
        assert (await client.get("/console/tasks/tsk_missing")).status_code == 404


async def test_retrying_a_failed_download_needs_the_form_token(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Without the token: 403 and still failed. With it: queued again, image.queued told."""
    service = await _service(service_factory, database_url, tmp_path)
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed", image_status="failed")
        await make_image(session, task.id, status="failed", error_code="http_404")
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get(f"/console/tasks/{task.id}")
        assert "Retry the failed download" in page.text
        refused = await client.post(f"/console/tasks/{task.id}/retry", data={})
        assert refused.status_code == 403
        rows = await service.sql("SELECT status FROM images WHERE task_id = :t", t=task.id)
        assert rows == [("failed",)]
        done = await client.post(
            f"/console/tasks/{task.id}/retry", data={"csrf_token": csrf_from(page.text)}
        )
        assert done.status_code == 303
        assert done.headers["location"] == f"/console/tasks/{task.id}?notice=retried"
        rows = await service.sql("SELECT status FROM images WHERE task_id = :t", t=task.id)
        assert rows == [("pending",)]
        types = await service.sql("SELECT type FROM events WHERE task_id = :t", t=task.id)
        assert types == [("image.queued",)]
        again = await client.post(
            f"/console/tasks/{task.id}/retry", data={"csrf_token": csrf_from(page.text)}
        )
        assert again.headers["location"].endswith("notice=nothing-to-retry")


async def test_the_overview_counts_what_happened(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Counts by status, the day's figures, p50/p95 completion → stored, lost images."""
    service = await _service(service_factory, database_url, tmp_path)
    now = utcnow()
    async with service.runtime.sessions() as session:
        for delay in (2, 4, 30):
            done = await make_task(
                session,
                status="completed",
                image_status="stored",
                completed_at=now - timedelta(minutes=5),
            )
            await make_image(
                session,
                done.id,
                status="stored",
                stored_at=now - timedelta(minutes=5) + timedelta(seconds=delay),
            )
        lost = await make_task(session, status="completed", image_status="failed", completed_at=now)
        await make_image(session, lost.id, status="failed", error_code="expired")
        await make_task(
            session, status="failed", error_code="content_policy_violation", completed_at=now
        )
        await make_task(session, status="pending", created_at=now - timedelta(days=3))
    stamp = now.replace(tzinfo=None) if service.runtime.settings.is_sqlite else now
    async with service.runtime.engine.begin() as db:
        for number, (status, attempts) in enumerate(
            [("failed", 8), ("pending", 2), ("pending", 0), ("delivered", 1)]
        ):
            await db.execute(
                text(
                    "INSERT INTO webhook_deliveries (event_id, task_id, owner, target, status, "
                    "attempts, next_attempt_at, created_at, updated_at) "
                    "VALUES (:e, :t, 'tests', 'task', :s, :a, :at, :at, :at)"
                ),
                {"e": f"evt_{number}", "t": lost.id, "s": status, "a": attempts, "at": stamp},
            )
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get("/console/overview")
    assert page.status_code == 200
    html = re.sub(r"\s+", " ", page.text)
    assert '<td id="fig-created">5</td>' in html
    assert "Completion → stored, p50</th><td>4.0 s" in html
    assert "Completion → stored, p95</th><td>30.0 s" in html
    assert 'Images lost (want 0)</th><td class="bad">1</td>' in html
    assert "content_policy_violation</th><td>1</td>" in html
    assert '<span class="badge completed">completed</span></th><td>4</td>' in html
    assert html.count("<rect ") == 24
    assert '<td id="fig-webhooks-failed" class="bad">1</td>' in html
    assert '<td id="fig-webhooks-retrying">1</td>' in html


async def test_static_files_are_served_by_content_hash(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The page links hashed names, served immutable; an old or made-up hash is 404."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with console_client(service) as client:
        page = await client.get("/console/sign-in")
        name = assets.url_name("console.css")
        assert f'href="/console/static/{name}"' in page.text
        css = await client.get(f"/console/static/{name}")
        assert css.status_code == 200
        assert "immutable" in css.headers["cache-control"]
        digest = hashlib.sha256(css.content).hexdigest()[:10]
        assert name == f"console.{digest}.css"
        assert (await client.get("/console/static/console.0000000000.css")).status_code == 404


async def test_the_console_can_be_switched_off(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """CONSOLE_ENABLED=false: no console routes at all."""
    service = await _service(service_factory, sqlite_url, tmp_path, console_enabled=False)
    async with console_client(service) as client:
        assert (await client.get("/console/sign-in")).status_code == 404


class FakeNotifications:
    """A notification store, as the webhook work will plug one in."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.redelivered: list[tuple[str, str]] = []

    async def for_task(self, db: AsyncConnection, task_id: str) -> list[NotificationView]:
        return [NotificationView("whd_1", self.at, "image.stored → caller: 500", failed=True)]

    async def redeliver(self, db: AsyncConnection, task_id: str, notification_id: str) -> None:
        self.redelivered.append((task_id, notification_id))


async def test_notifications_plug_in_through_the_hook(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Without a store: none kept, redelivery 404. With one: listed, in the timeline, and
    Redeliver (with the form token) reaches it."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path)
    service.app.state.console_notifications = None
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get(f"/console/tasks/{task.id}")
        assert "keeps no notifications to callers." in page.text
        token = {"csrf_token": csrf_from(page.text)}
        path = f"/console/tasks/{task.id}/notifications/whd_1/redeliver"
        missing = await client.post(path, data=token)
        assert missing.status_code == 404
        store = FakeNotifications(task.created_at + timedelta(seconds=30))
        service.app.state.console_notifications = store
        page = await client.get(f"/console/tasks/{task.id}")
        assert "image.stored → caller: 500" in page.text
        titles = re.findall(r'<span class="what">([^<]+)</span>', page.text)
        assert titles[-1] == "Notification to the caller"
        assert (await client.post(path, data={})).status_code == 403
        assert store.redelivered == []
        sent = await client.post(path, data=token)
        assert sent.status_code == 303
        assert store.redelivered == [(task.id, "whd_1")]


async def test_the_answer_to_a_submission_is_on_the_timeline(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Accepted (with StarMagic's id) or refused (with its reason): one entry each."""
    service = await _service(service_factory, database_url, tmp_path)
    accepted = await service.client.post("/tasks", json={"prompt": "a harbour"})
    assert accepted.status_code == 202
    refused = await service.client.post(
        "/tasks", json={"prompt": "a harbour [sim:submit_status=400]"}
    )
    assert refused.status_code == 502
    refused_id = refused.json()["error"]["details"][0]["task_id"]
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get(f"/console/tasks/{accepted.json()['id']}")
        titles = re.findall(r'<span class="what">([^<]+)</span>', page.text)
        assert titles[:3] == [
            "Submitted",
            "Created",
            "StarMagic&#39;s answer to the submission: accepted",
        ]
        assert f"StarMagic task {accepted.json()['upstream_task_id']}" in page.text
        page = await client.get(f"/console/tasks/{refused_id}")
        titles = re.findall(r'<span class="what">([^<]+)</span>', page.text)
        assert "StarMagic&#39;s answer to the submission: refused" in titles


async def test_webhooks_to_the_caller_are_shown_and_redelivered(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """A task's webhook deliveries appear with their last outcome; Redeliver queues the
    event again (status pending, attempts reset) through the webhooks' own redelivery."""
    service = await _service(service_factory, database_url, tmp_path)
    async with service.runtime.sessions() as session:
        task = await make_task(
            session,
            status="completed",
            image_status="failed",
            webhook_url="https://orders.example.com/hooks/imagetasks",
            webhook_events=",image.queued,",
        )
        await make_image(session, task.id, status="failed", error_code="http_404")
    async with console_client(service) as client:
        await sign_in(client)
        page = await client.get(f"/console/tasks/{task.id}")
        assert "None sent." in page.text
        retried = await client.post(
            f"/console/tasks/{task.id}/retry", data={"csrf_token": csrf_from(page.text)}
        )
        assert retried.status_code == 303
        (event_id,) = [
            row[0]
            for row in await service.sql("SELECT id FROM events WHERE task_id = :t", t=task.id)
        ]
        now = utcnow()
        async with service.runtime.engine.begin() as db:
            await db.execute(
                text(
                    "UPDATE webhook_deliveries SET status = 'failed', attempts = 8 "
                    "WHERE event_id = :e"
                ),
                {"e": event_id},
            )
            (delivery_id,) = (
                await db.execute(
                    text("SELECT id FROM webhook_deliveries WHERE event_id = :e"), {"e": event_id}
                )
            ).one()
            await db.execute(
                text(
                    "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, "
                    "duration_ms) VALUES (:d, :at, 500, 12)"
                ),
                {
                    "d": delivery_id,
                    "at": now.replace(tzinfo=None) if service.runtime.settings.is_sqlite else now,
                },
            )
        page = await client.get(f"/console/tasks/{task.id}")
        assert (
            "image.queued → the task&#39;s webhook_url: failed, 1 attempt(s), last HTTP 500"
            in page.text
        )
        assert "Notification to the caller" in re.findall(
            r'<span class="what">([^<]+)</span>', page.text
        )
        path = f"/console/tasks/{task.id}/notifications/{event_id}/redeliver"
        assert (await client.post(path, data={})).status_code == 403
        sent = await client.post(path, data={"csrf_token": csrf_from(page.text)})
        assert sent.status_code == 303
        rows = await service.sql(
            "SELECT status, attempts FROM webhook_deliveries WHERE event_id = :e", e=event_id
        )
        assert rows == [("pending", 0)]
        other = await client.post(
            f"/console/tasks/{task.id}/notifications/evt_other/redeliver",
            data={"csrf_token": csrf_from(page.text)},
        )
        assert other.status_code == 404
