"""The simulator's ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from app.simulator.config import SimulatorConfig
from app.simulator.control import control_router
from app.simulator.files import files_router
from app.simulator.provider import provider_router
from app.simulator.state import SimulatorState
from app.simulator.validation import ProviderError


async def _provider_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProviderError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_simulator_app(config: SimulatorConfig | None = None) -> FastAPI:
    """A StarMagic stand-in; its state is on ``app.state.simulator``.

    Background work starts lazily. Run alone, the app's lifespan stops it at
    shutdown; mounted in another app (whose lifespan is the only one that
    runs), call ``await sim_app.state.simulator.aclose()`` from the parent's.
    """
    state = SimulatorState(config or SimulatorConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.aclose()

    app = FastAPI(title="StarMagic simulator", version="1", lifespan=lifespan)
    app.state.simulator = state
    app.add_exception_handler(ProviderError, _provider_error)
    app.include_router(provider_router(state))
    app.include_router(files_router(state))
    app.include_router(control_router(state))
    return app
