"""The provider's own routes: submit and query, behind its bearer key."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.simulator import engine
from app.simulator.faults import FaultError
from app.simulator.payloads import task_object
from app.simulator.state import SimulatorState
from app.simulator.validation import ProviderError, validate_submission


def _check_key(request: Request, state: SimulatorState) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), state.config.api_key.encode()
    ):
        raise ProviderError(
            401, "invalid_api_key", "Invalid or missing API key", type_="authentication_error"
        )


def provider_router(state: SimulatorState) -> APIRouter:
    """Routes at ``/v1``, bound to ``state``."""
    router = APIRouter(tags=["provider"])

    @router.post("/v1/images/generations")
    async def submit(request: Request) -> JSONResponse:
        """Accept a generation task, as StarMagic does."""
        _check_key(request, state)
        state.counters["submit_requests"] += 1
        try:
            body = await request.json()
        except ValueError:
            raise ProviderError(422, "invalid_json", "the request body is not valid JSON") from None
        submission = validate_submission(body, state.config.allow_http_callbacks)
        try:
            faults = state.faults.with_prompt(submission.prompt)
        except FaultError as exc:
            raise ProviderError(400, "invalid_sim_directive", str(exc), param="prompt") from None
        if faults.submit_status is not None:
            state.counters["rejected_submits"] += 1
            status = faults.submit_status
            raise ProviderError(
                status,
                "rate_limited" if status == 429 else f"http_{status}",
                f"simulated refusal with HTTP {status}",
                type_="server_error" if status >= 500 else "invalid_request_error",
                headers={"Retry-After": "1"} if status == 429 else None,
            )
        task = engine.create_task(state, submission, faults)
        answer = task_object(task, state.config.credits_per_call)
        if faults.submit_delay:
            # The task exists already: a client that times out here must not submit again.
            await asyncio.sleep(faults.submit_delay)
        return JSONResponse(answer)

    @router.get("/v1/tasks/{task_id}")
    async def get_task(task_id: str, request: Request, language: str | None = None) -> JSONResponse:
        """The task's current snapshot in the ``{"code", "data"}`` envelope."""
        _check_key(request, state)
        task = state.tasks.get(task_id)
        if task is None:
            raise ProviderError(404, "task_not_found", f"task {task_id} not found")
        return JSONResponse(engine.query(state, task))

    return router
