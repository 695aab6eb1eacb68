"""Odd input to the console: a clear refusal, never a 500, and nothing changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_TOKEN, Service, make_settings
from tests.console.helpers import console_client, csrf_from, sign_in
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")

PAGES = [
    ("/console/tasks/a%00b", 404),
    ("/console/tasks/" + "x" * 65, 422),
    ("/console/tasks/tsk_none/image?variant=thumb", 404),
    ("/console/tasks/tsk_none/image?variant=../../etc", 422),
    ("/console/tasks/tsk_none/images/99", 422),
    ("/console/cards?cursor=" + "A" * 600, 422),
    ("/console/cards/" + "%FF" * 10, 404),
    ("/console?meta=" + "k=" + "v" * 300, 422),
    ("/console?created_after=2026-13-45T99:99", 422),
    ("/console?created_after=0001-01-01T00:00%2B01:00", 422),  # before year 1 in UTC
    # A cursor whose instant is before year 1 once in UTC.
    (
        "/console/cards?cursor=WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzAxOjAwIiwgInRza18wMU04TVY5MlIyRkNFQTZOVzUzN1I1WFFLMyJd",
        422,
    ),
    ("/console/stream?after=1.2.3", 422),
    ("/console/stream?task=a%00b", 404),
    ("/console/static/..%2F..%2Fconfig.py", 404),
    ("/console/sign-in?next=" + "a" * 600, 422),
]


@pytest.mark.parametrize(("path", "status"), PAGES)
async def test_odd_requests_get_a_clear_answer(
    service_factory: Any, sqlite_url: str, tmp_path: Path, path: str, status: int
) -> None:
    """Each odd request is refused with its own status, no 500."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    async with console_client(service) as client:
        await sign_in(client)
        response = await client.get(path, headers={"Accept": "*/*"})
        assert response.status_code == status, response.text


async def test_an_oversized_token_is_refused_before_any_check(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A 10,000-character token: 422 naming the field, no session."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    async with console_client(service) as client:
        form = await client.get("/console/sign-in")
        response = await client.post(
            "/console/sign-in", data={"token": API_TOKEN * 400, "csrf_token": csrf_from(form.text)}
        )
        assert response.status_code == 422
        assert "token" in response.json()["error"]["message"]
        assert (await client.get("/console")).status_code == 303


@pytest.mark.parametrize("query", ["q=a%00b", "meta=order_id%3Da%00b"])
async def test_a_nul_character_in_a_filter_is_refused_not_a_500(
    service_factory: Any, database_url: str, tmp_path: Path, query: str
) -> None:
    """PostgreSQL text cannot hold NUL: the filter is named as invalid (422, and 404 for
    the cards' fetch), never sent to the database to fail there."""
    service: Service = await service_factory(
        make_settings(database_url, tmp_path), simulator_transport()[0]
    )
    async with console_client(service) as client:
        await sign_in(client)
        gallery = await client.get(f"/console?{query}", headers={"Accept": "*/*"})
        assert gallery.status_code == 422, gallery.text
        cards = await client.get(f"/console/cards?{query}", headers={"Accept": "*/*"})
        assert cards.status_code == 404, cards.text
