"""Task lifecycle: creation, the timed pending → processing → terminal run, links, queries."""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from typing import Any

from app.simulator.callbacks import send_terminal
from app.simulator.faults import Fault, Outcome
from app.simulator.payloads import failure, shape_of, snapshot
from app.simulator.state import Link, SimTask, SimulatorState
from app.simulator.validation import Submission

_ID_ALPHABET = string.ascii_lowercase + string.digits
STEPS = 10  # the timeline moves in tenths of the (scaled) estimated time


def new_task_id(created: int) -> str:
    """An id in the provider's format, ``task-unified-<unix>-<8 lowercase alnum>``."""
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    return f"task-unified-{created}-{suffix}"


def create_task(state: SimulatorState, submission: Submission, faults: Fault) -> SimTask:
    """Record an accepted submission and start its timeline."""
    created = int(time.time())
    eta = faults.eta if faults.eta is not None else state.config.estimated_time
    task = SimTask(
        id=new_task_id(created), submission=submission, faults=faults, eta=eta, created=created
    )
    state.tasks[task.id] = task
    state.counters["submits"] += 1
    task.timeline = state.spawn(_run_timeline(state, task))
    return task


async def _run_timeline(state: SimulatorState, task: SimTask) -> None:
    step = task.eta * state.config.time_scale / STEPS
    await asyncio.sleep(step)
    task.status, task.progress = "processing", 100 // STEPS
    for progress in range(2 * 100 // STEPS, 100, 100 // STEPS):
        await asyncio.sleep(step)
        task.progress = progress
    await asyncio.sleep(step)
    finish(state, task, task.faults.outcome)


def mint_link(
    state: SimulatorState, task: SimTask, index: int = 0, *, revoked: bool = False
) -> Link:
    """A new link for image ``index`` of ``task``, valid for ``link_ttl_seconds``."""
    name = f"{task.id}-{index}-{secrets.token_hex(4)}.png"
    link = Link(
        name=name,
        task_id=task.id,
        index=index,
        url=f"{state.config.public_base_url}/files/{name}",
        expires_at=int(time.time()) + state.config.link_ttl_seconds,
        revoked=revoked,
    )
    task.links.append(link)
    state.links[name] = link
    return link


def mint_links(state: SimulatorState, task: SimTask, *, revoked: bool = False) -> list[Link]:
    """A new link for each of the task's ``n`` images, in order."""
    return [mint_link(state, task, index, revoked=revoked) for index in range(task.submission.n)]


def finish(state: SimulatorState, task: SimTask, outcome: Outcome) -> bool:
    """Move ``task`` to ``outcome`` and schedule its callbacks; False if already terminal."""
    if task.terminal:
        return False
    if task.timeline is not None and task.timeline is not asyncio.current_task():
        task.timeline.cancel()
    task.status = outcome
    if outcome == "completed":
        task.progress = 100
        task.completed = int(time.time())
        task.actual_time = round((time.monotonic() - task.started) / state.config.time_scale)
        mint_links(state, task, revoked=task.faults.image_expired)
    elif outcome == "failed":
        task.error = failure(task.faults.error_code)
    state.counters[outcome] += 1
    if task.submission.callback_url and not task.faults.drop:
        state.spawn_callbacks(send_terminal(state, task))
    return True


def query(state: SimulatorState, task: SimTask) -> dict[str, Any]:
    """The query API's answer; renews refused or lapsed links first, as the provider does."""
    task.queries += 1
    state.counters["queries"] += 1
    now = time.time()
    for link in task.current_links:
        if (link.revoked and link.refusals) or now >= link.expires_at:
            mint_link(state, task, link.index)
    return snapshot(task, shape_of(state, task))
