"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import RuntimeDep
from app.outage import OutageLog, short_reason
from app.schema_version import schema_status
from app.storage import StorageError

router = APIRouter(tags=["health"])
log = structlog.get_logger(__name__)
READY_TIMEOUT = 3.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


class NotReady(Exception):
    """A dependency answers but cannot be used as it is; the message says why."""


@router.get("/readyz", responses={503: {"description": "A dependency is unreachable"}})
async def readyz(runtime: RuntimeDep, request: Request) -> JSONResponse:
    """The database answers at the current schema, and the storage is reachable."""
    checks: dict[str, str] = {}

    async def database() -> None:
        status = await schema_status(runtime.engine)
        if not status.current:
            raise NotReady(status.describe())

    for name, check in (("database", database), ("storage", runtime.storage.check)):
        try:
            await asyncio.wait_for(check(), READY_TIMEOUT)
            checks[name] = "ok"
        except NotReady as exc:
            checks[name] = str(exc)
        except StorageError as exc:
            checks[name] = f"unavailable: {exc}"
        except TimeoutError:
            checks[name] = f"unavailable: no answer within {READY_TIMEOUT:g} s"
        except Exception as exc:
            checks[name] = f"unavailable: {short_reason(exc)}"
    outage: OutageLog | None = getattr(request.app.state, "database_outage", None)
    if outage is not None and checks["database"] == "ok":
        outage.recovered()
    ready = all(value == "ok" for value in checks.values())
    failing = {k: v for k, v in checks.items() if v != "ok"}
    # Probes come every few seconds: log a change of state, not every answer.
    previous: dict[str, str] = getattr(request.app.state, "readiness_failing", {})
    if failing != previous:
        if failing:
            log.warning("not_ready", **failing)
        else:
            log.info("ready_again", was=", ".join(sorted(previous)))
        request.app.state.readiness_failing = failing
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
