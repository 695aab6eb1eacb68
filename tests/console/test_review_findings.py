"""Regressions of the console's review: the variant renders (transaction, bound,
coalescing, remembered failures, corrupt originals), revocable sessions, a stream that
ends with its session and carries task events only, session-bound anti-forgery tokens."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage
from sqlalchemy.engine import make_url

from app import variants
from app.api.deps import caller_id
from app.console import auth, sign_outs
from app.models import utcnow
from app.services import events
from tests.conftest import API_TOKEN, Service, make_settings
from tests.console.helpers import console_client, csrf_from, sign_in, stored_task
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _service(service_factory: Any, url: str, tmp_path: Path, **settings: Any) -> Service:
    built: Service = await service_factory(
        make_settings(url, tmp_path, **settings), simulator_transport()[0]
    )
    return built


def _corrupt_png() -> bytes:
    """A PNG whose header is fine and whose second IDAT chunk has a broken type."""
    rnd = random.Random(7)
    pixels = bytes(rnd.randrange(256) for _ in range(300 * 300 * 3))
    out = io.BytesIO()
    PILImage.frombytes("RGB", (300, 300), pixels).save(out, format="PNG")
    data = bytearray(out.getvalue())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    data[second : second + 4] = b"\x00@r\xe1"
    return bytes(data)


async def test_sign_out_ends_the_session_even_for_a_replayed_cookie(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """After sign-out, the old session cookie (copied before) no longer opens the console."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    async with console_client(service) as client:
        assert (await sign_in(client)).status_code == 303
        stolen = client.cookies.get(auth.SESSION_COOKIE)
        page = await client.get("/console")
        out = await client.post("/console/sign-out", data={"csrf_token": csrf_from(page.text)})
        assert out.status_code == 303
    async with console_client(service) as replay:
        replay.cookies.set(auth.SESSION_COOKIE, stolen or "", path="/console")
        again = await replay.get("/console", follow_redirects=False)
        assert again.status_code == 303, "a signed-out session cookie still opens the gallery"


async def test_an_anti_forgery_token_is_bound_to_the_session(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A (nonce, token) pair anyone gets from the public sign-in form does not pass for a
    signed-in operator's session (double-submit tokens must be tied to the session)."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path)
    async with console_client(service) as attacker:
        form = await attacker.get("/console/sign-in")
        nonce = attacker.cookies.get(auth.CSRF_COOKIE)
        token = csrf_from(form.text)
    async with console_client(service) as victim:
        assert (await sign_in(victim, "second-token-bbbbbbbbbbbbbbbbbb")).status_code == 303
        # The attacker's nonce in the victim's jar (a sibling host can set it: same site).
        victim.cookies.set(auth.CSRF_COOKIE, nonce or "", path="/console")
        forged = await victim.post(f"/console/tasks/{task.id}/retry", data={"csrf_token": token})
        assert forged.status_code == 403, "a token minted for another browser was accepted"


async def test_a_variant_of_a_corrupt_stored_image_is_a_clear_404_not_a_500(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """GET ?variant=thumb on a stored PNG that Pillow cannot decode answers variant_unavailable."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path, data=_corrupt_png())
    transport = httpx.ASGITransport(app=service.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://imagetasks.test") as api:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        original = await api.get(f"/tasks/{task.id}/image", headers=headers)
        assert original.status_code == 200
        thumb = await api.get(f"/tasks/{task.id}/image?variant=thumb", headers=headers)
        assert thumb.status_code == 404, (thumb.status_code, thumb.text[:200])
        assert thumb.json()["error"]["code"] == "variant_unavailable"


async def test_concurrent_requests_for_a_missing_variant_render_it_once(
    service_factory: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight browsers asking at once for a thumb not yet made decode the original once,
    not eight times (each decode of a 64-Mpixel PNG holds about 512 MB)."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite serializes these requests on its write lock (the test below)")
    service = await _service(service_factory, database_url, tmp_path)
    task = await stored_task(service, tmp_path)
    calls: list[int] = []
    real = variants.render_all

    def counted(original: bytes | Path, long_sides: Sequence[int]) -> list[bytes]:
        calls.extend(long_sides)
        time.sleep(0.2)  # a big image takes seconds: let the requests overlap
        return real(original, long_sides)

    monkeypatch.setattr(variants, "render_all", counted)
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://imagetasks.test") as api:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        answers = await asyncio.gather(
            *(api.get(f"/tasks/{task.id}/image?variant=thumb", headers=headers) for _ in range(8))
        )
    assert all(answer.status_code == 200 for answer in answers)
    assert len(calls) == 1, f"the original was decoded {len(calls)} times for one thumb"


async def test_rendering_a_variant_on_request_does_not_hold_the_sqlite_write_lock(
    service_factory: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Pillow renders a missing variant (seconds for a big image), other writers
    (callbacks, submissions, the worker) can still take SQLite's write lock."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path)
    database = make_url(sqlite_url).database
    seen: list[str] = []
    real = variants.render_all

    def render_while_another_writer_tries(
        original: bytes | Path, long_sides: Sequence[int]
    ) -> list[bytes]:
        other = sqlite3.connect(str(database), timeout=0.5, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            seen.append("free")
        except sqlite3.OperationalError as exc:
            seen.append(str(exc))
        finally:
            other.close()
        return real(original, long_sides)

    monkeypatch.setattr(variants, "render_all", render_while_another_writer_tries)
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://imagetasks.test") as api:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        thumb = await api.get(f"/tasks/{task.id}/image?variant=thumb", headers=headers)
    assert thumb.status_code == 200
    assert seen == ["free"], f"another writer during the render got: {seen}"


async def _read_stream(
    app: Any,
    cookie: str,
    until: str,
    wait: float = 5.0,
    on_open: Callable[[], Awaitable[None]] | None = None,
) -> tuple[str, bool]:
    """The console stream's body as it arrives, until `until` shows up (or `wait` passes),
    and whether the service ended the stream by itself; `on_open` runs once it is open."""
    received: list[str] = []
    seen = asyncio.Event()
    opened: list[asyncio.Task[None]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b"").decode())
            if on_open is not None and not opened and "".join(received).startswith("retry:"):
                opened.append(asyncio.create_task(on_open()))
            if until in "".join(received):
                seen.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/console/stream",
        "raw_path": b"/console/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"imagetasks.test"),
            (b"cookie", f"{auth.SESSION_COOKIE}={cookie}".encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("imagetasks.test", 443),
    }
    running = asyncio.create_task(app(scope, receive, send))
    waiting = asyncio.create_task(seen.wait())
    await asyncio.wait({running, waiting}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    ended = running.done()
    for done in opened:
        await done
    for task in (running, waiting):
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    return "".join(received), ended


async def test_the_console_stream_carries_no_other_callers_endpoint_urls(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The gallery only needs task ids: another caller's disabled endpoint (its URL may
    carry a credential) is not pushed to every operator's browser."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    secret_url = "https://hooks.other.example/in?key=sk_live_do_not_leak"
    async with service.runtime.engine.begin() as db:
        await events.record_endpoint_disabled(
            db,
            {"id": "ep_other", "url": secret_url, "enabled": False},
            owner="someone-else",
            now=utcnow(),
        )
    cookie = auth.issue_session(service.runtime.settings, caller_id(API_TOKEN))
    body, _ = await _read_stream(service.app, cookie, until="endpoint.disabled", wait=3.0)
    assert "retry:" in body, body[:300]
    assert secret_url not in body, "another caller's endpoint URL reached the console stream"


async def test_an_open_console_stream_ends_when_its_session_expires(
    service_factory: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose session expires while it is open is ended by the service (at the
    latest at a heartbeat) rather than going on for as long as the process runs."""
    service = await _service(service_factory, sqlite_url, tmp_path, console_session_hours=1)
    service.runtime.events.heartbeat_seconds = 0.5
    settings = service.runtime.settings
    cookie = auth.issue_session(settings, caller_id(API_TOKEN))
    later = [0.0]
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: time.time() + later[0]))

    async def two_hours_pass() -> None:
        later[0] = 2 * 3600.0

    body, ended = await _read_stream(
        service.app, cookie, until="never sent", wait=6.0, on_open=two_hours_pass
    )
    assert auth.read_session(settings, cookie) is None
    assert body.startswith("retry:"), body[:200]
    assert ended, f"the stream outlived its session by 5 s: {body.count('heartbeat')} heartbeats"


def _claimed_size_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a canvas of width x height (the pixels never come)."""
    out = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    start = data.index(b"IHDR")
    header = bytes(data[start : start + 17])
    patched = header[:4] + struct.pack(">II", width, height) + header[12:]
    data[start : start + 17] = patched
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(patched))
    return bytes(data)


async def test_a_failed_render_is_remembered_and_not_decoded_again(
    service_factory: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt original is decoded once: later requests answer variant_unavailable at once."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    task = await stored_task(service, tmp_path, data=_corrupt_png())
    calls: list[int] = []
    real = variants.render_all

    def counted(original: bytes | Path, long_sides: Sequence[int]) -> list[bytes]:
        calls.extend(long_sides)
        return real(original, long_sides)

    monkeypatch.setattr(variants, "render_all", counted)
    transport = httpx.ASGITransport(app=service.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://imagetasks.test") as api:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        for _ in range(3):
            thumb = await api.get(f"/tasks/{task.id}/image?variant=thumb", headers=headers)
            assert thumb.status_code == 404, (thumb.status_code, thumb.text[:200])
            assert thumb.json()["error"]["code"] == "variant_unavailable"
    assert calls == [256], f"the corrupt original was decoded {len(calls)} times"


async def test_on_demand_renders_are_bounded_per_process(
    service_factory: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four different missing variants asked at once: at most two render at the same time."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    tasks = [await stored_task(service, tmp_path) for _ in range(2)]
    lock = threading.Lock()
    running: list[int] = [0]
    most: list[int] = [0]
    third = threading.Event()
    real = variants.render_all

    def overlapping(original: bytes | Path, long_sides: Sequence[int]) -> list[bytes]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] >= 3:
                third.set()
        third.wait(1.0)  # without a bound, a third render starts while these wait
        try:
            return real(original, long_sides)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(variants, "render_all", overlapping)
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://imagetasks.test") as api:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        answers = await asyncio.gather(
            *(
                api.get(f"/tasks/{task.id}/image?variant={name}", headers=headers)
                for task in tasks
                for name in ("thumb", "preview")
            )
        )
    assert [answer.status_code for answer in answers] == [200] * 4
    assert most[0] <= 2, f"{most[0]} renders ran at once"


async def test_a_canvas_over_the_variant_limit_is_refused_before_decoding() -> None:
    """An 8192x8191 PNG (0.5 GB decoded) is refused from its header, not decoded."""
    with pytest.raises(variants.VariantError, match="too large"):
        variants.render(_claimed_size_png(8192, 8191), 256)


async def test_every_pillow_decode_error_of_a_corrupt_png_is_a_variant_error() -> None:
    """A PNG broken in its data (Pillow raises SyntaxError) is a VariantError, not a crash."""
    with pytest.raises(variants.VariantError):
        variants.render(_corrupt_png(), 256)


async def test_sign_out_on_one_replica_ends_the_session_on_the_other(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """Two replicas on one database: signing out on the first closes the console on the
    second for that cookie, and only for that session."""
    first = await _service(service_factory, database_url, tmp_path / "a")
    second = await _service(service_factory, database_url, tmp_path / "b")
    async with console_client(first) as other:
        assert (await sign_in(other)).status_code == 303
        kept = other.cookies.get(auth.SESSION_COOKIE)
    async with console_client(first) as client:
        assert (await sign_in(client)).status_code == 303
        cookie = client.cookies.get(auth.SESSION_COOKIE)
        page = await client.get("/console")
        out = await client.post("/console/sign-out", data={"csrf_token": csrf_from(page.text)})
        assert out.status_code == 303
    for value, status in ((cookie, 303), (kept, 200)):
        async with console_client(second) as replay:
            replay.cookies.set(auth.SESSION_COOKIE, value or "", path="/console")
            answer = await replay.get("/console", follow_redirects=False)
            assert answer.status_code == status, (value == cookie, answer.status_code)


async def test_an_open_console_stream_ends_when_its_session_is_signed_out(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Signing the session out (here, as another replica would) ends its open stream."""
    service = await _service(service_factory, sqlite_url, tmp_path)
    service.runtime.events.heartbeat_seconds = 0.5
    settings = service.runtime.settings
    cookie = auth.issue_session(settings, caller_id(API_TOKEN))
    session = auth.read_session(settings, cookie)
    assert session is not None

    async def sign_out() -> None:
        await sign_outs.sign_out(
            service.runtime.engine, session.id, session.caller, session.expires_at, utcnow()
        )

    body, ended = await _read_stream(
        service.app, cookie, until="never sent", wait=6.0, on_open=sign_out
    )
    assert body.startswith("retry:"), body[:200]
    assert ended, f"the stream outlived its sign-out: {body.count('heartbeat')} heartbeats"
