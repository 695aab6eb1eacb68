"""The FastAPI application and its lifespan."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app import __version__, console
from app.api import events, health, images, tasks, webhook_endpoints, webhooks
from app.config import Settings, SettingsError, get_settings
from app.errors import install_error_handlers
from app.logging import configure_logging
from app.middleware import (
    BodyLimitMiddleware,
    ForwardedHostMiddleware,
    RequestContextMiddleware,
    RootPathMiddleware,
)
from app.runtime import Runtime
from app.sandbox import SIMULATOR_PREFIX
from app.simulator import SimulatorConfig, create_simulator_app
from app.worker import BackgroundWorker

DESCRIPTION = """\
Submit image generations to StarMagic and get the finished image back from
durable storage. All `/tasks` routes need `Authorization: Bearer <token>`.
Errors always come as `{"error": {"code", "message", "details"?}}`.
"""


def create_app(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    simulator: SimulatorConfig | None = None,
) -> FastAPI:
    """The service's ASGI app; the runtime is built in the lifespan unless given.

    `simulator` (sandbox mode only) mounts a StarMagic simulator in the app.
    """
    simulator_app = create_simulator_app(simulator) if simulator is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = runtime or Runtime.build(settings)
        app.state.runtime = current
        await current.events.start(current.engine)
        worker = (
            BackgroundWorker(current, database_outage=app.state.database_outage)
            if settings.run_background
            else None
        )
        if worker is not None:
            await worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            await current.aclose()
            if simulator_app is not None:
                await simulator_app.state.simulator.aclose()

    # Swagger UI and ReDoc load their scripts from the package, not a CDN: /docs
    # works on a network without internet access.
    app = FastAPIOffline(
        title="imagetasks",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(RootPathMiddleware, root_path=settings.root_path)
    # Forwarded headers are believed only from the proxies named in TRUSTED_PROXIES.
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    # Outermost, so that it still sees the proxy's own address, not the forwarded client.
    app.add_middleware(ForwardedHostMiddleware, trusted_hosts=settings.trusted_proxies)
    app.include_router(tasks.router)
    app.include_router(events.router)
    app.include_router(webhook_endpoints.router)
    app.include_router(images.router)
    app.include_router(webhooks.router)
    app.include_router(health.router)
    if settings.console_enabled:
        console.install(app)
    if simulator_app is not None:
        app.mount(SIMULATOR_PREFIX, simulator_app)
    return app


def _from_environment() -> FastAPI:
    try:
        settings = get_settings()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"imagetasks: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    return create_app(settings)


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` reads this; tests build their own app instead.
    if name == "app":
        return _from_environment()
    raise AttributeError(name)
