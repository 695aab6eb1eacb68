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
