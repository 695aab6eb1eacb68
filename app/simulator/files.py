"""Image links: ``GET /files/{name}``, public like a CDN URL, with the task's image faults."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from app.simulator import images
from app.simulator.state import Link, SimTask, SimulatorState

_EXPIRED = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n"
    b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
)


def _png(state: SimulatorState, task: SimTask, link: Link) -> asyncio.Future[bytes]:
    """The image's bytes, rendered once in a worker thread; concurrent GETs share the work."""
    rendering = task.pngs.get(link.index)
    if rendering is None:
        width, height = state.config.image_size or (task.submission.width, task.submission.height)
        seed = images.image_seed(task.id, link.index)
        rendering = asyncio.ensure_future(asyncio.to_thread(images.render_png, seed, width, height))
        task.pngs[link.index] = rendering
    return rendering


def files_router(state: SimulatorState) -> APIRouter:
    """The image-link route, bound to ``state``."""
    router = APIRouter(tags=["files"])

    @router.get("/files/{name}")
    async def get_file(name: str) -> Response:
        """Serve an image link's bytes, or the failure its task's faults ask for."""
        link = state.links.get(name)
        task = state.tasks.get(link.task_id) if link is not None else None
        if link is None or task is None:
            return Response(b"Not Found", status_code=404, media_type="text/plain")
        link.gets += 1
        task.image_gets += 1
        state.counters["image_gets"] += 1
        faults = task.faults
        if link.expired(time.time()):
            link.refusals += 1
            return Response(_EXPIRED, status_code=403, media_type="application/xml")
        if task.served_503 < faults.image_503:
            task.served_503 += 1
            return Response(
                b"Service Unavailable",
                status_code=503,
                media_type="text/plain",
                headers={"Retry-After": "1"},
            )
        if faults.redirect_to:
            return RedirectResponse(faults.redirect_to, status_code=302)
        if faults.not_image:
            return Response(images.NOT_AN_IMAGE, media_type="image/png")
        # shield: a client hanging up must not cancel the render the cache holds.
        png = await asyncio.shield(_png(state, task, link))
        if faults.oversize == "header":
            # Claims far more than it sends: the connection breaks after the small body.
            headers = {"Content-Length": str(state.config.oversize_bytes)}
            return Response(png, media_type="image/png", headers=headers)
        if faults.oversize == "stream":
            body = images.oversize_body(png, state.config.oversize_bytes)
            return StreamingResponse(body, media_type="image/png")
        size = images.padded_size(png, faults.image_size)
        stream = images.padded_png(png, faults.image_size)
        if faults.image_slow:
            stream = images.trickle(stream, size, faults.image_slow)
        return StreamingResponse(
            stream, media_type="image/png", headers={"Content-Length": str(size)}
        )

    return router
