"""Test controls under ``/_sim`` (no auth: the simulator is never exposed publicly).

- ``GET  /_sim/stats``                   counters, per task and per link
- ``GET  /_sim/tasks``                   every task's inspection view, oldest first
- ``GET  /_sim/tasks/{id}``              one task: state, faults, links, callback attempts
- ``GET  /_sim/faults``                  the global default faults
- ``POST /_sim/faults``                  replace them: ``{"dup": 2, "drop": true}`` (``{}`` clears)
- ``POST /_sim/reset``                   forget everything, restore the configured faults
- ``POST /_sim/tasks/{id}/complete``     finish now: ``{"outcome": "completed|failed|cancelled"}``
- ``POST /_sim/tasks/{id}/expire``       revoke the current image links (403 until a query renews)
- ``POST /_sim/tasks/{id}/callback``     send a callback now, see ``CallbackRequest``
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from app.simulator import engine
from app.simulator.callbacks import deliver
from app.simulator.faults import FaultError, Outcome, Shape, fault_from_mapping
from app.simulator.payloads import shape_of, snapshot
from app.simulator.state import SimTask, SimulatorState, Status


class CompleteRequest(BaseModel):
    """Which terminal state to force."""

    outcome: Outcome = "completed"


class CallbackRequest(BaseModel):
    """An on-demand callback: a stale, duplicate, forged or out-of-order delivery."""

    status: Status | None = Field(None, description="snapshot as if the task were in this status")
    progress: int | None = Field(None, ge=0, le=100)
    body: Shape | None = Field(None, description="default: the task's shape")
    payload: dict[str, Any] | None = Field(None, description="sent verbatim instead of a snapshot")
    callback_url: str | None = Field(None, description="default: the task's callback_url")
    retry: bool = Field(False, description="apply the retry policy")


def control_router(state: SimulatorState) -> APIRouter:
    """The ``/_sim`` routes, bound to ``state``."""
    router = APIRouter(prefix="/_sim", tags=["simulator control"])

    def get(task_id: str) -> SimTask:
        task = state.tasks.get(task_id)
        if task is None:
            raise HTTPException(404, f"task {task_id} not found")
        return task

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Counters: submits, queries, image GETs per task and per link, callback attempts."""
        return state.stats()

    @router.get("/tasks")
    async def list_tasks() -> list[dict[str, Any]]:
        """Every task, oldest first."""
        return [task.to_dict() for task in state.tasks.values()]

    @router.get("/tasks/{task_id}")
    async def show_task(task_id: str) -> dict[str, Any]:
        """One task's state, faults, links and callback attempts."""
        return get(task_id).to_dict()

    @router.get("/faults")
    async def show_faults() -> dict[str, Any]:
        """The faults applied to new submissions before their prompt directives."""
        return state.faults.to_dict()

    @router.post("/faults")
    async def set_faults(values: dict[str, Any]) -> dict[str, Any]:
        """Replace the global default faults; same names and values as prompt directives."""
        try:
            state.faults = fault_from_mapping(values)
        except FaultError as exc:
            raise HTTPException(400, str(exc)) from None
        return state.faults.to_dict()

    @router.post("/reset")
    async def reset() -> dict[str, Any]:
        """Forget every task, link and counter; cancel pending work."""
        await state.reset()
        return state.stats()

    @router.post("/tasks/{task_id}/complete")
    async def complete(task_id: str, order: CompleteRequest | None = None) -> dict[str, Any]:
        """Finish a task now with the given outcome; 409 if it already finished."""
        task = get(task_id)
        if not engine.finish(state, task, (order or CompleteRequest()).outcome):
            raise HTTPException(409, f"task {task_id} is already {task.status}")
        return task.to_dict()

    @router.post("/tasks/{task_id}/expire")
    async def expire(task_id: str) -> dict[str, Any]:
        """Revoke every image's current link; the first query after a refused GET renews it."""
        task = get(task_id)
        links = task.current_links
        if not links:
            raise HTTPException(409, f"task {task_id} has no image link")
        for link in links:
            link.revoked = True
        return task.to_dict()

    @router.post("/tasks/{task_id}/callback")
    async def callback(task_id: str, request: CallbackRequest) -> dict[str, Any]:
        """Deliver one callback now and answer with its attempts."""
        task = get(task_id)
        url = request.callback_url or task.submission.callback_url
        if url is None:
            raise HTTPException(409, f"task {task_id} has no callback_url; pass one")
        body = request.payload
        if body is None:
            if request.status == "completed" and not task.current_links:
                engine.mint_links(state, task)
            shape = request.body or shape_of(state, task)
            body = snapshot(task, shape, status=request.status, progress=request.progress)
        attempts = await deliver(state, task, body, kind="manual", url=url, retry=request.retry)
        return {"body": body, "attempts": [asdict(attempt) for attempt in attempts]}

    return router
