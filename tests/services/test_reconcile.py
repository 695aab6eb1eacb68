"""The reconciler: quiet tasks are queried, lost submissions settled, nothing lost."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import update
from sqlmodel import col
from structlog.testing import capture_logs

from app import activity
from app.callback_urls import sign
from app.config import Settings
from app.models import Task, utcnow
from app.simulator.faults import DEFAULT_ERROR_CODE
from app.simulator.payloads import FAILURE_MESSAGE
from tests.conftest import WEBHOOK_SECRET, Service, make_settings
from tests.helpers import GatedQueries, break_applying, dumps, simulator_transport, task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Harness:
    """The service (background loops off), its simulator, and a query counter."""

    def __init__(self, service: Service, sim: httpx.AsyncClient, upstream: GatedQueries) -> None:
        self.service = service
        self.sim = sim
        self.upstream = upstream
        self.queries = upstream.queries
        self.reconciler = service.runtime.reconciler

    async def submit(self, prompt: str = "a fox") -> str:
        response = await self.service.client.post("/tasks", json={"prompt": prompt})
        assert response.status_code == 202, response.text
        task_id: str = response.json()["id"]
        return task_id

    async def make_due(self, task_id: str, **columns: Any) -> None:
        """Pretend the task has been quiet long enough (and set other columns)."""
        values = {
            "next_poll_at": utcnow() - timedelta(seconds=1),
            "poll_claimed_at": None,
            **columns,
        }
        async with self.service.runtime.sessions() as session, session.begin():
            await session.execute(update(Task).where(col(Task.id) == task_id).values(**values))

    async def row(self, task_id: str, columns: str) -> tuple[Any, ...]:
        """Typed column values of one task (datetimes stay datetimes on SQLite)."""
        async with self.service.runtime.sessions() as session:
            task = await session.get(Task, task_id)
        assert task is not None
        return tuple(getattr(task, name.strip()) for name in columns.split(","))

    async def callback(self, task_id: str, body: dict[str, Any]) -> str:
        """Deliver a provider callback to the webhook; the outcome it was recorded with."""
        path = f"/webhooks/starmagic/{task_id}/{sign(task_id, WEBHOOK_SECRET)}"
        response = await self.service.client.post(path, content=dumps(body))
        assert response.status_code == 200, response.text
        outcome: str = response.json()["outcome"]
        return outcome

    async def asked_to_confirm(self, prompt: str) -> str:
        """A task completed at the provider whose callback now waits for the worker's
        confirmation (confirmations off the request path); its id."""
        task_id = await self.submit(prompt)
        (upstream_id,) = await self.row(task_id, "upstream_task_id")
        assert (await self.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        body = task_body("completed", upstream_id=upstream_id)
        assert await self.callback(task_id, body) == "confirming"
        return task_id

    async def wait_status(self, task_id: str, status: str, timeout: float = 20.0) -> None:
        """Poll the row until the task reaches `status` (bounded)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (await self.row(task_id, "status"))[0] != status:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"task {task_id} never became {status}")
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="session")
async def harness(service_factory: Any, settings: Settings) -> Harness:
    """Callbacks dropped by the simulator, so only the reconciler can learn outcomes."""
    transport, _ = simulator_transport(estimated_time=100, time_scale=10.0)
    upstream = GatedQueries(transport)
    service: Service = await service_factory(settings, upstream)
    sim = httpx.AsyncClient(transport=transport, base_url="http://starmagic.test")
    return Harness(service, sim, upstream)


async def test_a_lost_callback_is_recovered_by_querying(harness: Harness) -> None:
    """A completed task whose callback never came is completed by the reconciler."""
    task_id = await harness.submit()
    (upstream_id,) = await harness.row(task_id, "upstream_task_id")
    assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
    await harness.make_due(task_id)
    assert await harness.service.runtime.reconciler.run_once() == 1
    status, image_status, next_poll = await harness.row(
        task_id, "status, image_status, next_poll_at"
    )
    assert (status, image_status, next_poll) == ("completed", "pending", None)
    assert harness.queries[upstream_id] == 1


async def test_a_still_running_task_is_polled_again_later(harness: Harness) -> None:
    """No outcome yet: the next look is pushed out and the attempt counted."""
    task_id = await harness.submit()
    await harness.make_due(task_id)
    before = utcnow()
    await harness.service.runtime.reconciler.run_once()
    status, attempts, next_poll, lease = await harness.row(
        task_id, "status, poll_attempts, next_poll_at, poll_lease_until"
    )
    assert status in ("pending", "processing")
    assert attempts == 1
    assert next_poll > before + timedelta(seconds=100)
    assert lease is None
    assert await harness.service.runtime.reconciler.run_once() == 0


async def test_tasks_not_due_are_left_alone(harness: Harness) -> None:
    """A task that had news recently is not queried."""
    await harness.submit()
    assert await harness.service.runtime.reconciler.run_once() == 0
    assert sum(harness.queries.values()) == 0


async def test_an_unknown_submission_is_settled_after_its_deadline(harness: Harness) -> None:
    """Without a provider id nothing can be queried: wait for the deadline, then fail."""
    task_id = await harness.submit()
    created = utcnow() - timedelta(hours=2)
    await harness.make_due(task_id, status="submitting", upstream_task_id=None, created_at=created)
    await harness.service.runtime.reconciler.run_once()
    status, code = await harness.row(task_id, "status, error_code")
    assert (status, code) == ("failed", "submission_outcome_unknown")


async def test_an_unknown_submission_waits_until_its_deadline(harness: Harness) -> None:
    """Before the deadline the task is only rescheduled to it."""
    task_id = await harness.submit()
    await harness.make_due(task_id, status="submitting", upstream_task_id=None)
    await harness.service.runtime.reconciler.run_once()
    status, next_poll = await harness.row(task_id, "status, next_poll_at")
    assert status == "submitting"
    assert next_poll > utcnow() + timedelta(minutes=30)


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ("completed", ("completed", None, "pending")),
        ("failed", ("failed", DEFAULT_ERROR_CODE, None)),
        ("still_running", ("failed", "no_outcome", None)),
        ("unreachable", ("failed", "no_outcome", None)),
    ],
)
async def test_a_task_past_its_link_lifetime_is_asked_once_before_giving_up(
    harness: Harness, provider: str, expected: tuple[str, str | None, str | None]
) -> None:
    """After 24 hours the provider is asked a last time: its outcome wins, else `no_outcome`."""
    task_id = await harness.submit()
    (upstream_id,) = await harness.row(task_id, "upstream_task_id")
    if provider in ("completed", "failed"):
        finish = await harness.sim.post(
            f"/_sim/tasks/{upstream_id}/complete", json={"outcome": provider}
        )
        assert finish.is_success
    harness.upstream.unreachable = provider == "unreachable"
    await harness.make_due(task_id, created_at=utcnow() - timedelta(hours=25))
    assert await harness.reconciler.run_once() == 1
    assert await harness.row(task_id, "status, error_code, image_status") == expected
    assert harness.queries[upstream_id] >= 1
    if provider == "completed":
        links = await harness.service.sql(
            "SELECT source_url FROM images WHERE task_id = :id", id=task_id
        )
        assert (
            [link for (link,) in links if link.startswith("http://starmagic.test/")]
            == [link for (link,) in links]
            != []
        )
    if provider == "failed":
        (message,) = await harness.row(task_id, "error_message")
        assert message == FAILURE_MESSAGE
    assert await harness.reconciler.run_once() == 0  # asked once, settled for good


async def test_a_callback_during_a_poll_keeps_the_task_due(harness: Harness) -> None:
    """A completion reported while the reconciler's query is out is not pushed back by backoff."""
    # No query may start on its own while the due time is checked; the next round then asks.
    harness.reconciler.query_spacing = timedelta(hours=1)
    task_id = await harness.submit()
    (upstream_id,) = await harness.row(task_id, "upstream_task_id")
    await harness.make_due(task_id)
    harness.upstream.hold()
    polling = asyncio.create_task(harness.reconciler.run_once())
    await harness.upstream.held.wait()  # the provider answered "pending"; the answer is held

    assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
    completed = task_body("completed", upstream_id=upstream_id)
    assert await harness.callback(task_id, completed) == "confirming"
    await harness.reconciler.wait_idle()  # the immediate confirmation met the poll's lease
    harness.upstream.release()
    assert await polling == 1

    status, next_poll = await harness.row(task_id, "status, next_poll_at")
    assert status in ("pending", "processing")
    assert next_poll <= utcnow()  # still due: the callback's request survived the reschedule
    harness.reconciler.query_spacing = timedelta(0)
    assert await harness.reconciler.run_once() == 1
    assert await harness.row(task_id, "status, image_status") == ("completed", "pending")
    assert harness.queries[upstream_id] == 2


async def test_a_callback_during_a_poll_is_confirmed_when_the_poll_ends(harness: Harness) -> None:
    """Without waiting for the next round: the poll that ends with a request pending confirms."""
    harness.reconciler.query_spacing = timedelta(0)  # scaled down from seconds
    task_id = await harness.submit()
    (upstream_id,) = await harness.row(task_id, "upstream_task_id")
    await harness.make_due(task_id)
    harness.upstream.hold()
    polling = asyncio.create_task(harness.reconciler.run_once())
    await harness.upstream.held.wait()

    assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
    completed = task_body("completed", upstream_id=upstream_id)
    assert await harness.callback(task_id, completed) == "confirming"
    await harness.reconciler.wait_idle()
    harness.upstream.release()
    assert await polling == 1
    await harness.wait_status(task_id, "completed")
    assert harness.queries[upstream_id] == 2


async def test_a_task_the_provider_does_not_know_fails_after_repeated_404s(
    harness: Harness,
) -> None:
    """Three not-found answers in a row fail the task."""
    task_id = await harness.submit()
    for _ in range(3):
        await harness.make_due(task_id, upstream_task_id="task-unified-0-unknown")
        await harness.service.runtime.reconciler.run_once()
    status, code = await harness.row(task_id, "status, error_code")
    assert (status, code) == ("failed", "upstream_not_found")


@pytest.mark.postgres
async def test_replicas_never_poll_the_same_task_at_once(
    service_factory: Any, postgres_database: str, tmp_path: Path
) -> None:
    """Two reconcilers racing over 30 due tasks query each task exactly once."""
    settings = make_settings(postgres_database, tmp_path)
    transport, _ = simulator_transport(estimated_time=100, time_scale=10.0)

    class Slow(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                await asyncio.sleep(0.01)  # keep the batches overlapping
            return await transport.handle_async_request(request)

    upstream = GatedQueries(Slow())
    queries = upstream.queries
    first: Service = await service_factory(settings, upstream)
    second: Service = await service_factory(settings, upstream)
    harness = Harness(first, httpx.AsyncClient(transport=transport), upstream)
    ids = [await harness.submit(f"p{index}") for index in range(30)]
    for task_id in ids:
        await harness.make_due(task_id)
    await asyncio.gather(
        first.runtime.reconciler.run_once(),
        second.runtime.reconciler.run_once(),
        first.runtime.reconciler.run_once(),
        second.runtime.reconciler.run_once(),
    )
    # The database is shared with other tests: count only this test's own tasks.
    mine = [(await harness.row(task_id, "upstream_task_id"))[0] for task_id in ids]
    assert len(set(mine)) == 30
    per_task = {upstream_id: queries[upstream_id] for upstream_id in mine}
    assert per_task == dict.fromkeys(mine, 1)


async def test_each_query_to_the_provider_is_kept_for_the_timeline(harness: Harness) -> None:
    """An answered poll then not-found answers until the task fails: a row each, in order."""
    task_id = await harness.submit()
    await harness.make_due(task_id)
    await harness.service.runtime.reconciler.run_once()
    for _ in range(2):  # the answered poll counts towards the not-found limit
        await harness.make_due(task_id, upstream_task_id="task-unified-0-unknown")
        await harness.service.runtime.reconciler.run_once()
    async with harness.service.runtime.engine.connect() as db:
        rows = await activity.for_task(db, task_id)
    assert [(row.kind, row.outcome) for row in rows] == [
        ("submit", "accepted"),
        ("query", "ok"),
        ("query", "not_found"),
        ("query", "not_found"),
    ]
    assert rows[1].detail is not None
    assert rows[1].detail.startswith("poll: StarMagic says ")
    assert (await harness.row(task_id, "status"))[0] == "failed"


async def test_without_the_loops_a_callback_leaves_its_confirmation_to_the_worker(
    harness: Harness,
) -> None:
    """RUN_BACKGROUND=false: the webhook queries nothing; one batch confirms every task once."""
    harness.service.runtime.confirms_in_process = False
    ids = [await harness.submit(f"p{index}") for index in range(5)]
    upstream = [(await harness.row(task_id, "upstream_task_id"))[0] for task_id in ids]
    for task_id, upstream_id in zip(ids, upstream, strict=True):
        assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        completed = task_body("completed", upstream_id=upstream_id)
        assert await harness.callback(task_id, completed) == "confirming"
        assert await harness.callback(task_id, completed) == "duplicate"
    await harness.reconciler.wait_idle()
    assert sum(harness.queries[u] for u in upstream) == 0  # nothing asked on the request path

    assert await harness.reconciler.confirm_due() == 5
    for task_id in ids:
        assert await harness.row(task_id, "status, image_status") == ("completed", "pending")
    assert {u: harness.queries[u] for u in upstream} == dict.fromkeys(upstream, 1)
    events = await harness.service.sql("SELECT task_id FROM events WHERE type = 'task.completed'")
    assert sorted(task_id for (task_id,) in events if task_id in ids) == sorted(ids)
    assert await harness.reconciler.confirm_due() == 0  # settled: nothing left due


async def test_the_confirmation_batch_skips_tasks_that_are_only_quiet(harness: Harness) -> None:
    """`confirm_due` takes only tasks a callback asked about; quiet ones wait for `run_once`."""
    harness.service.runtime.confirms_in_process = False
    quiet = await harness.submit("quiet")
    await harness.make_due(quiet)
    asked = await harness.asked_to_confirm("asked")
    assert await harness.reconciler.confirm_due() == 1
    assert (await harness.row(asked, "status"))[0] == "completed"
    (quiet_upstream,) = await harness.row(quiet, "upstream_task_id")
    assert harness.queries[quiet_upstream] == 0
    assert await harness.reconciler.run_once() == 1  # the quiet one, by the regular poll


async def test_a_batch_that_fails_as_a_whole_applies_each_answer_alone(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One answer that cannot be applied does not lose the others of its batch."""
    harness.service.runtime.confirms_in_process = False
    ids = [await harness.asked_to_confirm(f"b{index}") for index in range(3)]
    break_applying(monkeypatch, ids[1], RuntimeError("this one cannot be applied"))
    assert await harness.reconciler.confirm_due() == 3
    statuses = [(await harness.row(task_id, "status"))[0] for task_id in ids]
    assert statuses[0] == statuses[2] == "completed"
    assert statuses[1] != "completed"


async def test_a_batch_that_fails_after_deciding_its_moves_tells_each_move_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose transaction fails after it decided its moves rolls them back:
    only the moves its fallback commits are logged, one `task_transition` each."""
    harness.service.runtime.confirms_in_process = False
    ids = [await harness.asked_to_confirm(f"t{index}") for index in range(2)]
    failures = 1

    def failing_once(write: Any) -> Any:
        async def write_or_fail(*args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise RuntimeError("the timeline cannot be written")
            return await write(*args, **kwargs)

        return write_or_fail

    # The timeline row is written after the move (alone and together alike).
    monkeypatch.setattr(activity, "note", failing_once(activity.note))
    monkeypatch.setattr(activity, "note_many", failing_once(activity.note_many))
    with capture_logs() as logs:
        await harness.reconciler.confirm_due()
    assert failures == 0
    assert [(await harness.row(task_id, "status"))[0] for task_id in ids] == ["completed"] * 2
    told = [line["task_id"] for line in logs if line["event"] == "task_transition"]
    assert sorted(told) == sorted(ids)
