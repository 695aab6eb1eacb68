"""The batches' queue on its own (no database): every callback queued is decided,
whenever it arrives relative to the batches already out."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from app.repository import OneStatement, TerminalCallback
from app.services.callback_batches import ConfirmationBatches

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Enough turns of the loop for a batch that needs no I/O to be taken and answered.
TURNS = 20


class InstantBatches(ConfirmationBatches):
    """Batches whose statement answers at once, remembering what each batch held."""

    def __init__(self, *, in_flight: int) -> None:
        super().__init__(None, in_flight=in_flight)  # type: ignore[arg-type]
        self.batches: list[list[str]] = []

    async def _run(
        self, callbacks: list[TerminalCallback], now: datetime
    ) -> dict[str, OneStatement]:
        self.batches.append([c.task_id for c in callbacks])
        return {c.task_id: OneStatement("confirming", "processing") for c in callbacks}


def _callback(task_id: str) -> TerminalCallback:
    return TerminalCallback(task_id, f"up-{task_id}", "completed", "0" * 64)


async def _turns() -> None:
    for _ in range(TURNS):
        await asyncio.sleep(0)


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_a_callback_queued_as_the_last_batch_ends_is_still_decided(in_flight: int) -> None:
    """The code woken by one batch's answer queues another callback before the batch's
    drainer is counted out: a drainer must still take it, not leave it waiting for
    the next arrival (a lone last callback would wait forever)."""
    batches = InstantBatches(in_flight=in_flight)

    async def one_then_another() -> list[OneStatement | None]:
        first = await batches.decide(_callback("tsk_a"))
        # Still in the step the answer woke: the drainer that gave it has just ended.
        second = await batches.decide(_callback("tsk_b"))
        return [first, second]

    started = [asyncio.ensure_future(one_then_another()) for _ in range(in_flight)]
    await _turns()
    assert all(job.done() for job in started), batches.batches
    for job in started:
        assert job.result() == [OneStatement("confirming", "processing")] * 2
    await batches.aclose()


async def test_every_callback_of_a_burst_is_decided_in_batches_of_at_most_the_limit() -> None:
    """More callbacks than a batch holds, and repeats of one task: each is answered,
    no batch is over the limit or holds a task twice."""
    batches = InstantBatches(in_flight=2)
    batches.max_batch = 8
    ids = [f"tsk_{n:03}" for n in range(40)] + ["tsk_000"] * 5
    answers = await asyncio.gather(*(batches.decide(_callback(i)) for i in ids))
    assert answers == [OneStatement("confirming", "processing")] * len(ids)
    assert all(len(batch) <= 8 and len(set(batch)) == len(batch) for batch in batches.batches)
    assert sorted(i for batch in batches.batches for i in batch) == sorted(ids)
    await batches.aclose()


def _batches_by_scanning(ids: list[str], limit: int) -> list[list[str]]:
    """The rule, stated as a scan of the whole queue: each batch holds the oldest
    callback of each task, oldest first, up to `limit` tasks; the rest keep their order."""
    queue, batches = list(ids), []
    while queue:
        batch: list[str] = []
        rest: list[str] = []
        for task_id in queue:
            (batch if len(batch) < limit and task_id not in batch else rest).append(task_id)
        batches.append(batch)
        queue = rest
    return batches


async def test_batches_take_the_oldest_callback_of_each_task_in_arrival_order() -> None:
    """A task's repeats wait for later batches; a batch holds the tasks whose oldest
    waiting callback came first, in that order, whatever was taken before."""
    batches = InstantBatches(in_flight=1)
    batches.max_batch = 3
    ids = ["a", "b", "a", "c", "a", "d", "b", "e", "a", "c", "f", "a", "a", "g", "b"]
    await asyncio.gather(*(batches.decide(_callback(i)) for i in ids))
    assert batches.batches == _batches_by_scanning(ids, 3)
    assert batches.batches[:2] == [["a", "b", "c"], ["a", "d", "b"]]
    await batches.aclose()


class CountedCallback(TerminalCallback):
    """A callback that counts how often the queue looks at its task id."""

    reads = 0

    def __getattribute__(self, name: str) -> object:
        if name == "task_id":
            CountedCallback.reads += 1
        return super().__getattribute__(name)


async def test_many_repeats_of_one_task_cost_work_in_proportion_to_their_number() -> None:
    """Thousands of callbacks about one task, a few others among them: one batch each
    (the others ride along), and the queue looks at each callback a bounded number
    of times, not once per batch it waits through."""
    repeats = 2000
    batches = InstantBatches(in_flight=1)
    ids = ["tsk_hot"] * repeats
    ids[1:1] = ["tsk_b", "tsk_c"]
    callbacks = [CountedCallback(i, f"up-{i}", "completed", "0" * 64) for i in ids]
    CountedCallback.reads = 0
    answers = await asyncio.gather(*(batches.decide(c) for c in callbacks))
    assert answers == [OneStatement("confirming", "processing")] * len(ids)
    assert batches.batches[0] == ["tsk_hot", "tsk_b", "tsk_c"]
    assert batches.batches[1:] == [["tsk_hot"]] * (repeats - 1)
    assert CountedCallback.reads <= 4 * len(ids)
    await batches.aclose()


class SlowBatches(InstantBatches):
    """Batches whose statement takes a moment, so requests can go away meanwhile."""

    async def _run(
        self, callbacks: list[TerminalCallback], now: datetime
    ) -> dict[str, OneStatement]:
        self.batches.append([c.task_id for c in callbacks])
        await asyncio.sleep(0.01)
        return {c.task_id: OneStatement("confirming", "processing") for c in callbacks}


async def test_requests_that_go_away_lose_no_other_callback_and_leave_nothing_queued() -> None:
    """Callers cancelled while their callback waits, or while its batch is out: every
    callback is still decided (it was received), the others are answered, and the
    queue ends empty."""
    batches = SlowBatches(in_flight=1)
    batches.max_batch = 2
    ids = ["a", "b", "a", "c", "a", "d", "b"]
    jobs = [asyncio.ensure_future(batches.decide(_callback(i))) for i in ids]
    await asyncio.sleep(0)
    jobs[2].cancel()  # a repeat still queued
    jobs[3].cancel()  # another task's, still queued
    await asyncio.sleep(0.005)
    jobs[0].cancel()  # its batch is out
    # Bounded: a drainer killed by a cancelled answer would leave the rest waiting.
    answers = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 5)
    cancelled = {0, 2, 3}
    for n, answer in enumerate(answers):
        if n in cancelled:
            assert isinstance(answer, asyncio.CancelledError)
        else:
            assert answer == OneStatement("confirming", "processing")
    assert sorted(i for batch in batches.batches for i in batch) == sorted(ids)
    assert batches.queued == 0
    await batches.aclose()
