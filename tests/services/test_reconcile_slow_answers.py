"""Poll batches: a slow or failing claim holds back only itself."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app import repository
from app.config import Settings
from app.models import utcnow
from app.repository import PollClaim
from app.services import reconcile
from tests.helpers import GatedQueries, break_applying, simulator_transport, task_body
from tests.services.test_reconcile import Harness

pytestmark = pytest.mark.asyncio(loop_scope="session")


class OneSlowQuery(GatedQueries):
    """Holds the provider's answer for one upstream id only; the others pass at once."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        super().__init__(inner)
        self.slow_ids: set[str] = set()
        self.slow_started = asyncio.Event()
        self.gate = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.url.path.rsplit("/", 1)[1] in self.slow_ids:
            await response.aread()
            self.slow_started.set()
            await self.gate.wait()  # a provider that answers this one slowly (up to 90 s)
        return response


@pytest_asyncio.fixture(loop_scope="session")
async def slow(service_factory: Any, settings: Settings) -> tuple[Harness, OneSlowQuery]:
    """The reconcile harness with one slow provider answer."""
    transport, _ = simulator_transport(estimated_time=100, time_scale=10.0)
    upstream = OneSlowQuery(transport)
    service = await service_factory(settings, upstream)
    sim = httpx.AsyncClient(transport=transport, base_url="http://starmagic.test")
    return Harness(service, sim, upstream), upstream


async def test_answers_are_applied_while_one_query_is_still_out(
    slow: tuple[Harness, OneSlowQuery],
) -> None:
    """Answers the provider already gave are applied while one other query is still out."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False  # RUN_BACKGROUND=false: the worker's loop
    ids = [await harness.submit(f"hol{index}") for index in range(3)]
    ups = [(await harness.row(task_id, "upstream_task_id"))[0] for task_id in ids]
    for task_id, upstream_id in zip(ids, ups, strict=True):
        assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        assert await harness.callback(task_id, task_body("completed", upstream_id=upstream_id)) == (
            "confirming"
        )
    upstream.slow_ids = {ups[0]}
    batch = asyncio.create_task(harness.reconciler.confirm_due())
    try:
        await asyncio.wait_for(upstream.slow_started.wait(), 10)
        for upstream_id in ups:
            assert upstream.queries[upstream_id] == 1  # every answer but one is in hand
        await harness.wait_status(ids[1], "completed", timeout=5)
        await harness.wait_status(ids[2], "completed", timeout=5)
    finally:
        upstream.gate.set()
        await batch


async def test_one_claims_unexpected_failure_is_its_own(
    slow: tuple[Harness, OneSlowQuery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that fails unexpectedly (say the database drops while it is rescheduled)
    is logged and released; the provider's answers for the other claims are applied."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False
    ids = [await harness.submit(f"blip{index}") for index in range(3)]
    ups = [(await harness.row(task_id, "upstream_task_id"))[0] for task_id in ids]
    for task_id, upstream_id in zip(ids, ups, strict=True):
        assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        assert await harness.callback(task_id, task_body("completed", upstream_id=upstream_id)) == (
            "confirming"
        )
    broken = ids[0]
    real_ask = harness.reconciler._ask

    async def ask(claim: Any) -> Any:
        if claim.id == broken:
            raise ConnectionResetError("the database connection dropped while rescheduling")
        return await real_ask(claim)

    monkeypatch.setattr(harness.reconciler, "_ask", ask)
    assert await harness.reconciler.confirm_due() == 3
    assert [upstream.queries[u] for u in ups[1:]] == [1, 1]  # the provider answered both
    statuses = [(await harness.row(task_id, "status"))[0] for task_id in ids]
    leases = [(await harness.row(task_id, "poll_lease_until"))[0] for task_id in ids]
    requested = (await harness.row(broken, "confirm_requested_at"))[0]
    # The failed claim is released still due, its confirmation request kept.
    assert (statuses, leases) == (["pending", "completed", "completed"], [None, None, None])
    assert requested is not None


async def test_regular_polls_are_applied_while_one_query_is_still_out(
    slow: tuple[Harness, OneSlowQuery],
) -> None:
    """`run_once` (the same batch code): the quiet tasks' answers do not wait for the slowest."""
    harness, upstream = slow
    ids = [await harness.submit(f"quiet{index}") for index in range(3)]
    ups = [(await harness.row(task_id, "upstream_task_id"))[0] for task_id in ids]
    for task_id, upstream_id in zip(ids, ups, strict=True):
        assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        await harness.make_due(task_id)
    upstream.slow_ids = {ups[0]}
    batch = asyncio.create_task(harness.reconciler.run_once())
    try:
        await asyncio.wait_for(upstream.slow_started.wait(), 10)
        await harness.wait_status(ids[1], "completed", timeout=5)
        await harness.wait_status(ids[2], "completed", timeout=5)
    finally:
        upstream.gate.set()
        await batch


async def _confirming(harness: Harness, prefix: str, count: int) -> tuple[list[str], list[str]]:
    """`count` tasks done at the provider whose completed callbacks asked for confirmation."""
    ids = [await harness.submit(f"{prefix}{index}") for index in range(count)]
    ups = [(await harness.row(task_id, "upstream_task_id"))[0] for task_id in ids]
    for task_id, upstream_id in zip(ids, ups, strict=True):
        assert (await harness.sim.post(f"/_sim/tasks/{upstream_id}/complete", json={})).is_success
        body = task_body("completed", upstream_id=upstream_id)
        assert await harness.callback(task_id, body) == "confirming"
    return ids, ups


async def test_a_query_past_its_deadline_is_rescheduled_before_the_lease_runs_out(
    slow: tuple[Harness, OneSlowQuery],
) -> None:
    """A provider that never answers one query: the batch ends at the deadline, the
    others applied, the slow claim rescheduled and its lease released."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False
    harness.reconciler.query_deadline = timedelta(seconds=0.5)
    ids, ups = await _confirming(harness, "late", 3)
    upstream.slow_ids = {ups[0]}
    try:
        assert await harness.reconciler.confirm_due() == 3
    finally:
        upstream.gate.set()
    statuses = [(await harness.row(task_id, "status"))[0] for task_id in ids]
    attempts, lease = await harness.row(ids[0], "poll_attempts, poll_lease_until")
    assert (statuses, attempts, lease) == (["pending", "completed", "completed"], 1, None)


async def test_a_claim_that_never_got_a_query_slot_stays_due_with_its_request(
    slow: tuple[Harness, OneSlowQuery],
) -> None:
    """Claims still waiting for a query slot at the deadline are released unasked: no
    attempt counted, the confirmation request kept."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False
    harness.reconciler.query_deadline = timedelta(seconds=0.5)
    harness.reconciler._slots = asyncio.Semaphore(1)
    ids, ups = await _confirming(harness, "slot", 3)
    async with harness.reconciler._slots:  # the only slot is taken by a poll still out
        assert await harness.reconciler.confirm_due() == 3
    rows = [
        await harness.row(task_id, "status, poll_attempts, poll_lease_until, confirm_requested_at")
        for task_id in ids
    ]
    assert sum(upstream.queries[u] for u in ups) == 0
    assert {row[:3] for row in rows} == {("pending", 0, None)}
    assert all(requested is not None for *_, requested in rows)


async def test_a_stale_claim_leaves_the_newer_claims_lease_alone(
    slow: tuple[Harness, OneSlowQuery],
) -> None:
    """A poll that ends after its lease ran out and another poll claimed the task
    neither releases that other poll's lease nor gives the task up."""
    harness, _ = slow
    task_id = await harness.submit("stale")
    upstream_id, created = await harness.row(task_id, "upstream_task_id, created_at")
    now = utcnow()
    newer = now - timedelta(seconds=1)
    lease = now + timedelta(seconds=60)
    await harness.make_due(task_id, poll_claimed_at=newer, poll_lease_until=lease)
    async with harness.service.runtime.sessions() as session, session.begin():
        db = await session.connection()
        stale = await repository.finish_poll(
            db,
            task_id,
            claimed_at=now - timedelta(seconds=90),
            next_poll_at=now + timedelta(minutes=15),
            values={"poll_attempts": 1},
        )
        released = await repository.release_poll(
            db, task_id, claimed_at=now - timedelta(seconds=90)
        )
    claim = PollClaim(task_id, upstream_id, created, 0, now - timedelta(seconds=90), None)
    await harness.reconciler._give_up(claim, "upstream_not_found", "gone", now)
    assert (stale, released) == (False, False)
    assert await harness.row(task_id, "status, poll_lease_until, poll_attempts") == (
        "pending",
        lease,
        0,
    )


async def test_the_workers_next_batch_starts_while_a_slow_query_is_out(
    slow: tuple[Harness, OneSlowQuery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`start_confirmations` does not wait for its queries: a confirmation asked after a
    slow one is claimed and confirmed while the slow one is still out, within the room."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False
    monkeypatch.setattr(reconcile, "CONFIRMS_IN_FLIGHT", 2)
    (first,), (first_up,) = await _confirming(harness, "first", 1)
    upstream.slow_ids = {first_up}
    try:
        assert await harness.reconciler.start_confirmations() == 1
        await asyncio.wait_for(upstream.slow_started.wait(), 10)
        (second,), _ = await _confirming(harness, "second", 1)
        assert await harness.reconciler.start_confirmations() == 1
        await harness.wait_status(second, "completed", timeout=5)
        (third,), _ = await _confirming(harness, "third", 1)
        # One slot of room is taken by the slow claim; the second has given its back.
        assert await harness.reconciler.start_confirmations() == 1
        await harness.wait_status(third, "completed", timeout=5)
        assert (await harness.row(first, "status"))[0] == "pending"
    finally:
        upstream.gate.set()
        await harness.reconciler.wait_idle()
    assert (await harness.row(first, "status"))[0] == "completed"


async def test_the_worker_claims_no_more_than_its_room(
    slow: tuple[Harness, OneSlowQuery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every claim of its room out, the worker leaves further confirmations due."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False
    monkeypatch.setattr(reconcile, "CONFIRMS_IN_FLIGHT", 1)
    (first,), (first_up,) = await _confirming(harness, "full", 1)
    upstream.slow_ids = {first_up}
    try:
        assert await harness.reconciler.start_confirmations() == 1
        await asyncio.wait_for(upstream.slow_started.wait(), 10)
        (second,), _ = await _confirming(harness, "waits", 1)
        assert await harness.reconciler.start_confirmations() == 0
    finally:
        upstream.gate.set()
        await harness.reconciler.wait_idle()
    assert await harness.reconciler.start_confirmations() == 1
    await harness.reconciler.wait_idle()
    assert [(await harness.row(t, "status"))[0] for t in (first, second)] == ["completed"] * 2


async def test_an_answer_that_cannot_be_applied_drops_no_other_answer(
    slow: tuple[Harness, OneSlowQuery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One answer whose apply fails on its own is logged and left to its lease; the
    answers that arrive after it in the same batch are still applied."""
    harness, upstream = slow
    harness.service.runtime.confirms_in_process = False
    ids, ups = await _confirming(harness, "apply", 3)
    error = ConnectionResetError("the database connection dropped while applying")
    failed = break_applying(monkeypatch, ids[0], error)
    upstream.slow_ids = set(ups[1:])  # the broken task's answer arrives first, alone
    batch = asyncio.create_task(harness.reconciler.confirm_due())
    try:
        await asyncio.wait_for(failed.wait(), 10)
    finally:
        upstream.gate.set()
    assert await batch == 3
    statuses = [(await harness.row(task_id, "status"))[0] for task_id in ids]
    assert statuses == ["pending", "completed", "completed"]
