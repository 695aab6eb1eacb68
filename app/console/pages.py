"""Rendering the console's pages: templates, hashed static URLs, the anti-forgery
token every form carries, and the headers every page is sent with."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.api.deps import TASK_ID
from app.console import auth
from app.console.assets import STATIC_DIR, Assets
from app.errors import NotFound

templates = Jinja2Templates(directory=STATIC_DIR.with_name("templates"))
assets = Assets()
# Pages: no caching, no framing, scripts and styles only from here.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}
TaskPathId = Annotated[str, Path(max_length=64)]


def root_of(request: Request) -> str:
    """The ROOT_PATH prefix this request came under ("" without one)."""
    return str(request.scope.get("root_path", ""))


def render(
    request: Request,
    template: str,
    settings: Any,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page, with the anti-forgery token its forms need and the console's headers."""
    response = HTMLResponse("")
    nonce = auth.csrf_nonce(request, response, settings)
    root = root_of(request)
    page = templates.TemplateResponse(
        request,
        template,
        {
            "root": root,
            "console": f"{root}/console",
            "static": lambda name: f"{root}/console/static/{assets.url_name(name)}",
            "csrf_field": auth.CSRF_FIELD,
            "csrf_token": auth.csrf_token(settings, nonce, auth.form_session_id(request, settings)),
            **context,
        },
        status_code=status_code,
        headers=_PAGE_HEADERS,
    )
    for key, value in response.headers.items():
        if key == "set-cookie":
            page.headers.append(key, value)
    return page


def checked_task_id(task_id: str) -> str:
    """A task id from the path; NotFound for one that could never exist."""
    if not TASK_ID.fullmatch(task_id):
        raise NotFound(f"task {task_id[:64]!r} does not exist")
    return task_id
