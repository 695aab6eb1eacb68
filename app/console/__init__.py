"""The operator console: server-rendered pages at /console for people who run the
service (a gallery, one task's story, actions, an overview).

It is served on the internal side only: the nginx example routes nothing but the
provider's callbacks from the public side. Sign-in takes one of API_TOKENS.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from app.console import auth, routes, task_routes
from app.console.notifications import WebhookNotifications
from app.console.pages import render
from app.errors import error_response

__all__ = ["install"]


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def install(app: FastAPI) -> None:
    """Mount the console's routes, and render its sign-in and forgery refusals."""
    app.include_router(routes.router)
    app.include_router(task_routes.router)
    # Webhooks to callers, shown on each task's page with a Redeliver button.
    app.state.console_notifications = WebhookNotifications()

    @app.exception_handler(auth.SignInRequired)
    async def _sign_in(request: Request, exc: auth.SignInRequired) -> Response:
        root = request.scope.get("root_path", "")
        if request.method == "GET" and _wants_html(request):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(
                f"{root}/console/sign-in?next={quote(target, safe='')}", status_code=303
            )
        if _wants_html(request):  # a form posted after the session ended: nothing was done
            return RedirectResponse(f"{root}/console/sign-in", status_code=303)
        return error_response(exc.status_code, exc.code, exc.message)

    @app.exception_handler(auth.ForgeryRefused)
    async def _forgery(request: Request, exc: auth.ForgeryRefused) -> Response:
        if not _wants_html(request):
            return error_response(exc.status_code, exc.code, exc.message)
        settings = request.app.state.runtime.settings
        return render(
            request,
            "error.html",
            settings,
            status_code=403,
            title="Refused",
            message=exc.message[0].upper() + exc.message[1:] + ".",
        )
