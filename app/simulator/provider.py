"""The provider's own routes: submit, query and cancel, behind its bearer key.

``DELETE /v1/tasks/{id}`` follows an unpublished draft: allowed while the task
is pending or processing. With ``cancel_supported`` off it answers like a
provider without the route (405, or 404 if so configured).
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.simulator import engine
from app.simulator.faults import SUBMIT_REFUSALS, FaultError
from app.simulator.payloads import cancelled_answer, submit_answer
from app.simulator.state import SimTask, SimulatorState
from app.simulator.validation import ProviderError, validate_submission

TASK_ID_PREFIX = "task-unified-"


def _check_key(request: Request, state: SimulatorState) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), state.config.api_key.encode()
    ):
        raise ProviderError(
            401, "unauthorized", "Invalid or missing API key", type_="authentication_error"
        )


def _refusal(status: int) -> ProviderError:
    """The submit refusal the ``submit_status`` fault asks for, by its published code."""
    code, type_ = SUBMIT_REFUSALS.get(
        status, (f"http_{status}", "server_error" if status >= 500 else "invalid_request_error")
    )
    return ProviderError(
        status,
        code,
        f"simulated refusal with HTTP {status}",
        type_=type_,
        headers={"Retry-After": "1"} if status == 429 else None,
    )


def _find(state: SimulatorState, task_id: str) -> SimTask:
    if not task_id.startswith(TASK_ID_PREFIX):
        raise ProviderError(
            400,
            "invalid_task_id",
            f"task_id must start with {TASK_ID_PREFIX}",
            param="task_id",
        )
    task = state.tasks.get(task_id)
    if task is None:
        raise ProviderError(404, "task_not_found", f"task {task_id} not found", param="task_id")
    return task


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
            raise _refusal(faults.submit_status)
        task = engine.create_task(state, submission, faults)
        answer = submit_answer(task)
        if faults.submit_delay:
            # The task exists already: a client that times out here must not submit again.
            await asyncio.sleep(faults.submit_delay)
        return JSONResponse(answer)

    @router.get("/v1/tasks/{task_id}")
    async def get_task(task_id: str, request: Request, language: str | None = None) -> JSONResponse:
        """The task's current snapshot, in its shape (the published task object by default)."""
        _check_key(request, state)
        return JSONResponse(engine.query(state, _find(state, task_id)))

    if state.config.cancel_supported:

        @router.delete("/v1/tasks/{task_id}")
        async def cancel_task(task_id: str, request: Request) -> JSONResponse:
            """Cancel a pending or processing task; 400 once it can no longer be cancelled."""
            _check_key(request, state)
            task = _find(state, task_id)
            if not engine.finish(state, task, "cancelled"):
                raise ProviderError(
                    400,
                    "task_not_cancellable",
                    f"task {task_id} is already {task.status} and cannot be cancelled",
                    param="task_id",
                )
            state.counters["cancel_requests"] += 1
            return JSONResponse(cancelled_answer(task))

    else:
        unsupported = state.config.cancel_unsupported_status

        @router.delete("/v1/tasks/{task_id}", include_in_schema=False)
        async def no_cancel(task_id: str) -> JSONResponse:
            """A provider without the cancel route: 405 (the path exists for GET) or 404."""
            if unsupported == 404:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return JSONResponse(
                {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": "GET"}
            )

    return router
