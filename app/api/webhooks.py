"""The provider's callback route: fast, idempotent, and closed to forgers."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app import metrics
from app.callback_urls import WEBHOOK_PATH
from app.db import statement_commits
from app.errors import DomainError
from app.middleware import log_on_request_line
from app.runtime import Runtime
from app.schemas import ErrorBody
from app.services.callbacks import apply_in_batch, receive_callback, receive_in_batch
from app.services.snapshots import Outcome

router = APIRouter(prefix=WEBHOOK_PATH, tags=["webhooks"])

_JSON_TYPES = ("application/json", "text/json", "application/problem+json")


class UnsupportedMediaType(DomainError):
    status_code = 415
    code = "unsupported_media_type"


class CallbackAck(BaseModel):
    """The callback was recorded; what it did to the task."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"received": True, "outcome": "applied"}]}
    )

    received: bool = Field(description="Always true: the delivery was recorded.")
    outcome: str = Field(
        description="applied, duplicate, stale, anomaly or confirming (a terminal callback "
        "waiting for the query API's word)."
    )


# Each answer's body, encoded once.
_ACKS = {
    outcome: CallbackAck(received=True, outcome=outcome.value).model_dump_json().encode()
    for outcome in Outcome
}


@router.post(
    "/{task_id}/{token}",
    response_model=CallbackAck,
    responses={
        400: {"model": ErrorBody, "description": "Body is not JSON"},
        404: {"model": ErrorBody, "description": "Unknown task or wrong token"},
        413: {"model": ErrorBody, "description": "Body over 1 MiB"},
        415: {"model": ErrorBody, "description": "Body is not JSON by its content type"},
        422: {"model": ErrorBody, "description": "JSON that is not a task snapshot"},
    },
)
async def starmagic_callback(
    task_id: Annotated[str, Path(description="The task the callback is about (our id).")],
    token: Annotated[str, Path(description="The task's callback token (signed).")],
    request: Request,
) -> Response:
    """StarMagic's task callback; every accepted delivery gets 200, duplicates too."""
    # The hottest route: no dependencies to solve and no model to validate on the way
    # out, and a database connection only when the batch statement does not decide.
    started = time.perf_counter()
    outcome = "rejected"
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in _JSON_TYPES:
            raise UnsupportedMediaType("callbacks must be JSON")
        raw = await request.body()
        received = None
        batches = runtime.callback_batches if settings.confirm_callbacks else None
        if batches is not None:
            received = await receive_in_batch(batches, settings, task_id, token, raw)
        elif not settings.confirm_callbacks and runtime.snapshot_batches is not None:
            received = await apply_in_batch(runtime.snapshot_batches, settings, task_id, token, raw)
        if received is None:
            async with statement_commits(runtime.engine) as db:
                received = await receive_callback(
                    db, settings, task_id, token, raw, one_statement=batches is None
                )
                await db.commit()  # recorded before we answer, and before confirming
        outcome = received.outcome.value
        log_on_request_line(request.scope, "callback_received", **received.log)
        if received.needs_confirmation and runtime.confirms_in_process:
            # Otherwise the task is due and the worker's confirmation loop claims it.
            runtime.reconciler.confirm_soon(task_id)
        return Response(_ACKS[received.outcome], media_type="application/json")
    finally:
        metrics.CALLBACKS.labels(outcome=outcome).inc()
        metrics.CALLBACK_SECONDS.observe(time.perf_counter() - started)
