"""Request errors say what to do: where the JSON breaks, which content type to send,
and every field path spelled one way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.errors import field_path
from tests.conftest import Service, make_settings
from tests.helpers import simulator_transport


async def build(service_factory: Any, sqlite_url: str, tmp_path: Path) -> Service:
    """The service on SQLite with an in-process simulator."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path), simulator_transport()[0]
    )
    return service


@pytest.mark.asyncio(loop_scope="session")
async def test_a_json_syntax_error_names_line_and_column(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A broken body gets 422 invalid_json pointing at the line and column, and stores nothing."""
    service = await build(service_factory, sqlite_url, tmp_path)
    body = b'{\n  "prompt": "a lighthouse",\n  "size": \n}'
    response = await service.client.post(
        "/tasks", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert error["message"] == "the body is not valid JSON: Expecting value at line 4, column 1"
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_body_without_the_json_content_type_is_told_so(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """`curl -d` sends a form content type by default: 415 says to send application/json."""
    service = await build(service_factory, sqlite_url, tmp_path)
    response = await service.client.post(
        "/tasks",
        content=b'{"prompt": "a lighthouse"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "`Content-Type: application/json`" in error["message"]
    assert "application/x-www-form-urlencoded" in error["message"]
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_body_with_no_content_type_at_all_is_told_so(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """A client that sends bytes with no Content-Type (e.g. requests' data=) gets 415 too."""
    service = await build(service_factory, sqlite_url, tmp_path)
    request = service.client.build_request("POST", "/tasks", content=b'{"prompt": "a lighthouse"}')
    request.headers.pop("Content-Type", None)
    response = await service.client.send(request)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "`Content-Type: application/json`" in error["message"]
    assert "no Content-Type" in error["message"]
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.asyncio(loop_scope="session")
async def test_field_paths_use_brackets_for_list_items(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The third image URL of the wrong type is `image_urls[2]`, in details and the message."""
    service = await build(service_factory, sqlite_url, tmp_path)
    response = await service.client.post(
        "/tasks", json={"prompt": "p", "image_urls": ["https://a.test/1", "https://a.test/2", 7]}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"][0]["field"] == "image_urls[2]"
    assert error["message"].startswith("image_urls[2]: ")
    listed = await service.client.get("/tasks", params={"limit": 0})
    assert listed.json()["error"]["details"][0]["field"] == "limit"


def test_field_path_spelling() -> None:
    """Names are joined by dots and indices are bracketed, at any depth."""
    assert field_path(["metadata", "tags", 0, "name"]) == "metadata.tags[0].name"
    assert field_path([3]) == "[3]"
    assert field_path([]) == ""


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "is empty: send a JSON object"),
        (b"[1]", "must be a JSON object, not an array"),
        (b'"a lighthouse"', "must be a JSON object, not a string"),
    ],
)
async def test_a_body_that_is_not_an_object_says_what_to_send(
    service_factory: Any, sqlite_url: str, tmp_path: Path, body: bytes, reason: str
) -> None:
    """An empty body or a JSON array is named as such, not as a pydantic error about `body`."""
    service = await build(service_factory, sqlite_url, tmp_path)
    response = await service.client.post(
        "/tasks", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"] == [{"field": "body", "reason": reason}]
    assert error["message"] == f"body: {reason}"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_body_that_is_not_utf8_is_told_so(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """JSON sent in Latin-1 gets 422 invalid_json saying to send UTF-8, not a bare 400."""
    service = await build(service_factory, sqlite_url, tmp_path)
    response = await service.client.post(
        "/tasks",
        content='{"prompt": "café"}'.encode("latin-1"),
        headers={"Content-Type": "application/json; charset=latin-1"},
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert "UTF-8" in error["message"]
    assert await service.sql("SELECT count(*) FROM tasks") == [(0,)]
