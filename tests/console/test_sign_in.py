"""Console sign-in: a token for a signed session cookie, and anti-forgery on every POST."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from app.console import auth
from tests.conftest import API_TOKEN, Service, make_settings
from tests.console.helpers import console_client, csrf_from, sign_in
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _service(service_factory: Any, url: str, tmp_path: Path, **settings: Any) -> Service:
    built: Service = await service_factory(
        make_settings(url, tmp_path, **settings), simulator_transport()[0]
    )
    return built


async def test_a_valid_token_gets_a_strict_httponly_expiring_session(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """303 to the console; the cookie is HttpOnly, SameSite=Strict, Secure on https, expiring."""
    service = await _service(service_factory, sqlite_url, tmp_path, console_session_hours=2)
    async with console_client(service) as client:
        response = await sign_in(client)
        assert response.status_code == 303
        assert response.headers["location"] == "/console"
        cookie = next(
            value
            for value in response.headers.get_list("set-cookie")
            if value.startswith(f"{auth.SESSION_COOKIE}=")
        )
        attributes = {part.strip().lower() for part in cookie.split(";")}
        assert "httponly" in attributes
        assert "samesite=strict" in attributes
        assert "secure" in attributes
        assert "max-age=7200" in attributes
        assert "path=/console" in attributes
        assert API_TOKEN not in cookie
        gallery = await client.get("/console")
        assert gallery.status_code == 200
        assert "Gallery" in gallery.text


async def test_a_wrong_token_is_refused_with_a_clear_message(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """401, the form again with the reason, and no session."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with console_client(service) as client:
        response = await sign_in(client, token="not-a-token-of-this-service")
        assert response.status_code == 401
        assert "not one of this service&#39;s API tokens" in response.text
        assert auth.SESSION_COOKIE not in client.cookies
        assert (await client.get("/console")).status_code == 303


async def test_pages_without_a_session_send_you_to_sign_in(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A page redirects to the form (keeping where you were going); other calls are 401."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with console_client(service) as client:
        page = await client.get("/console/overview?x=1")
        assert page.status_code == 303
        assert page.headers["location"] == "/console/sign-in?next=%2Fconsole%2Foverview%3Fx%3D1"
        stream = await client.get("/console/stream", headers={"Accept": "text/event-stream"})
        assert stream.status_code == 401
        assert stream.json()["error"]["code"] == "console_sign_in_required"
        bearer = await service.client.get("/console/overview")
        assert bearer.status_code == 401  # an API token is not a console session
        late = await client.post("/console/tasks/tsk_x/retry", data={"csrf_token": "x"})
        assert late.status_code == 303  # a form sent after the session ended: sign in again
        assert late.headers["location"] == "/console/sign-in"


async def test_posts_without_the_anti_forgery_token_are_refused(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Missing or wrong csrf_token: 403 with a clear reason, and nothing happens."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with console_client(service) as client:
        no_token = await client.post("/console/sign-in", data={"token": API_TOKEN})
        assert no_token.status_code == 403
        assert "anti-forgery token is missing or does not match" in no_token.text
        assert auth.SESSION_COOKIE not in client.cookies
        assert (await sign_in(client)).status_code == 303
        forged = await client.post("/console/sign-out", data={"csrf_token": "forged"})
        assert forged.status_code == 403
        assert (await client.get("/console")).status_code == 200  # still signed in
        page = await client.get("/console")
        out = await client.post("/console/sign-out", data={"csrf_token": csrf_from(page.text)})
        assert out.status_code == 303
        assert (await client.get("/console")).status_code == 303


async def test_a_next_target_off_the_console_is_ignored(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Signing in never redirects to another site or outside /console."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    for target in ("https://evil.example/console", "//evil.example/console", "/tasks"):
        async with console_client(service) as client:
            form = await client.get("/console/sign-in")
            response = await client.post(
                "/console/sign-in",
                data={"token": API_TOKEN, "csrf_token": csrf_from(form.text), "next": target},
            )
            assert response.headers["location"] == "/console"


async def test_sessions_are_refused_when_forged_expired_or_their_token_is_gone(
    tmp_path: Path,
) -> None:
    """Only an unaltered, unexpired value whose token is still configured proves a session."""
    settings = make_settings("sqlite+aiosqlite:///x.db", tmp_path)
    caller = auth.token_caller(settings, API_TOKEN)
    assert caller is not None
    value = auth.issue_session(settings, caller)
    assert auth.read_session(settings, value) is not None
    body, _, signature = value.rpartition(".")
    assert auth.read_session(settings, body.replace("v1.", "v1.9", 1) + "." + signature) is None
    assert auth.read_session(settings, value[:-2] + "xx") is None
    later = time.time() + settings.console_session_hours * 3600 + 1
    assert auth.read_session(settings, value, now=later) is None
    rotated = make_settings(
        "sqlite+aiosqlite:///x.db", tmp_path, api_tokens="other-token-" + "z" * 20
    )
    assert auth.read_session(rotated, value) is None
    assert auth.token_caller(settings, "") is None
