"""Console sign-in: an API token exchanged for a signed, expiring session cookie,
and the anti-forgery token every state-changing form carries.

The session cookie holds no secret: its expiry, a random nonce and the caller's
non-secret id (`caller_id` of the token), signed with HMAC-SHA256 under a key
derived from the first WEBHOOK_SECRET. The nonce is the session's id. A session
ends when it expires, when its token leaves API_TOKENS, when the webhook secret is
rotated, or when its operator signs out (recorded in the database, so a copy of the
cookie is refused on every replica).

Forms carry `csrf_token`, an HMAC of a random nonce kept in its own HttpOnly,
SameSite=Strict cookie and, once signed in, of the session's id: a page on another
site can neither read the nonce nor send the cookie, and a token minted for another
browser's nonce (the sign-in form hands one to anyone) does not pass for a session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response

from app.api.deps import RuntimeDep, SettingsDep, caller_id
from app.config import Settings
from app.console import sign_outs
from app.errors import DomainError
from app.runtime import Runtime

SESSION_COOKIE = "imagetasks_console"
CSRF_COOKIE = "imagetasks_console_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
ANONYMOUS = "anonymous"


class SignInRequired(DomainError):
    """No valid session: pages redirect to the sign-in form, other routes answer 401."""

    status_code = 401
    code = "console_sign_in_required"


class ForgeryRefused(DomainError):
    """A state-changing request without a valid anti-forgery token."""

    status_code = 403
    code = "csrf_token_invalid"


def _key(settings: Settings, purpose: str) -> bytes:
    secret = settings.signing_secret.encode()
    return hmac.new(secret, f"imagetasks console {purpose}".encode(), hashlib.sha256).digest()


def _mac(settings: Settings, purpose: str, message: str) -> str:
    digest = hmac.new(_key(settings, purpose), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def token_caller(settings: Settings, presented: str) -> str | None:
    """The caller id for a presented API token, after a constant-time check; None if wrong."""
    if settings.auth_disabled:
        return ANONYMOUS
    valid = False
    for token in settings.api_tokens:
        valid |= hmac.compare_digest(token.encode(), presented.encode())
    return caller_id(presented) if valid and presented else None


@dataclass(frozen=True)
class Session:
    caller: str
    expires_at: int
    id: str = ""  # the cookie's nonce; empty for a session built by hand


def issue_session(settings: Settings, caller: str, *, now: float | None = None) -> str:
    """A signed session value for this caller, expiring after CONSOLE_SESSION_HOURS."""
    expires = int((now or time.time()) + settings.console_session_hours * 3600)
    body = f"v1.{expires}.{secrets.token_urlsafe(12)}.{caller}"
    return f"{body}.{_mac(settings, 'session', body)}"


def read_session(
    settings: Settings, value: str | None, *, now: float | None = None
) -> Session | None:
    """The session a cookie value proves, or None (forged, expired, or its token revoked)."""
    if not value or len(value) > 300:
        return None
    body, _, signature = value.rpartition(".")
    if not hmac.compare_digest(signature, _mac(settings, "session", body)):
        return None
    parts = body.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
        return None
    expires, session_id, caller = int(parts[1]), parts[2], parts[3]
    if expires <= (now or time.time()):
        return None
    if settings.auth_disabled:
        return Session(caller, expires, session_id)
    if caller not in {caller_id(token) for token in settings.api_tokens}:
        return None
    return Session(caller, expires, session_id)


async def current_session(runtime: Runtime, value: str | None) -> Session | None:
    """The session a cookie value proves, unless it was signed out (on any replica)."""
    session = read_session(runtime.settings, value)
    if session is None or await sign_outs.is_signed_out(runtime.engine, session.id):
        return None
    return session


async def session_lasts(runtime: Runtime, value: str | None) -> bool:
    """Whether a cookie's session still stands (for a stream opened with it)."""
    return await current_session(runtime, value) is not None


def cookie_path(request: Request) -> str:
    """The console's path, under any ROOT_PATH prefix."""
    return f"{request.scope.get('root_path', '')}/console"


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=cookie_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def start_session(request: Request, response: Response, settings: Settings, caller: str) -> None:
    """Set the session cookie and a fresh anti-forgery nonce (a signed-in page's forms)."""
    max_age = int(settings.console_session_hours * 3600)
    _set_cookie(request, response, SESSION_COOKIE, issue_session(settings, caller), max_age)
    _set_cookie(request, response, CSRF_COOKIE, secrets.token_urlsafe(16), max_age)


def end_session(request: Request, response: Response) -> None:
    """Clear both cookies."""
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path=cookie_path(request), httponly=True, samesite="strict")


def csrf_nonce(request: Request, response: Response, settings: Settings) -> str:
    """The request's anti-forgery nonce; a new one is set on the response if it has none."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce or len(nonce) > 64:
        nonce = secrets.token_urlsafe(16)
        max_age = int(settings.console_session_hours * 3600)
        _set_cookie(request, response, CSRF_COOKIE, nonce, max_age)
    return nonce


def csrf_token(settings: Settings, nonce: str, session_id: str | None = None) -> str:
    """The token a form carries for this nonce, bound to the session once signed in."""
    if session_id is None:
        return _mac(settings, "csrf", f"pre-session.{nonce}")
    return _mac(settings, "csrf", f"session.{session_id}.{nonce}")


def form_session_id(request: Request, settings: Settings) -> str | None:
    """The id of the session a form's token is bound to (None before signing in)."""
    session = read_session(settings, request.cookies.get(SESSION_COOKIE))
    return session.id if session is not None else None


async def check_csrf(request: Request, settings: Settings) -> None:
    """ForgeryRefused unless the form field (or X-CSRF-Token) matches the nonce cookie
    and, with a session cookie, that session."""
    nonce = request.cookies.get(CSRF_COOKIE)
    expected = csrf_token(settings, nonce or "", form_session_id(request, settings))
    presented = request.headers.get(CSRF_HEADER)
    if presented is None:
        form = await request.form()
        field = form.get(CSRF_FIELD)
        presented = field if isinstance(field, str) else None
    if not nonce or not presented or not hmac.compare_digest(presented, expected):
        raise ForgeryRefused(
            "refused: this form's anti-forgery token is missing or does not match your "
            "session; reload the page and try again"
        )


async def require_session(request: Request, runtime: RuntimeDep) -> Session:
    """The signed-in session; SignInRequired otherwise."""
    session = await current_session(runtime, request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired("sign in to the console first")
    return session


SessionRequired = Annotated[Session, Depends(require_session)]


async def require_form(request: Request, settings: SettingsDep) -> None:
    """For state-changing routes: the anti-forgery check (before anything else)."""
    await check_csrf(request, settings)


CsrfChecked = Annotated[None, Depends(require_form)]
