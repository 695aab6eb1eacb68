"""Every field of POST /tasks is part of what an Idempotency-Key is bound to.

The fields come from `TaskCreate` itself, so a field added later is covered
without touching this file: for each one a second valid value is derived from
the model's JSON schema and the model's own validation.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_asyncio

from app.config import Settings
from app.schemas import TaskCreate
from app.services.tasks import fingerprint
from tests.conftest import Service
from tests.helpers import simulator_transport

BASE_BODY: dict[str, Any] = {"prompt": "a lighthouse at dawn"}
FIELDS = [field.alias or name for name, field in TaskCreate.model_fields.items()]
_SCHEMA = TaskCreate.model_json_schema()


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        resolved: dict[str, Any] = _SCHEMA["$defs"][ref.rsplit("/", 1)[-1]]
        return resolved
    return schema


def _candidates(schema: dict[str, Any]) -> list[Any]:
    """Values a field of this schema might take: its allowed ones first, then typed guesses."""
    schema = _resolve(schema)
    values: list[Any] = []
    if "const" in schema:
        values.append(schema["const"])
    values.extend(schema.get("enum", []))
    # Values the field documents (`low`, `medium` or `high`), for rules the schema cannot say.
    values.extend(re.findall(r"`([^`]+)`", schema.get("description", "")))
    for branch in [*schema.get("anyOf", []), *schema.get("oneOf", [])]:
        values.extend(_candidates(branch))
    guesses: dict[str, list[Any]] = {
        # Short first: a free-text field may be bounded by its column, not by the model.
        "string": [
            "2K",
            "1:1",
            "1024x1024",
            "https://images.example.com/mask.png",
            "another lighthouse, at dusk",
        ],
        "array": [["https://images.example.com/reference-1.png"]],
        "object": [{"order_id": "A-1042"}],
        "integer": [1, 2, 3, 4],
        "number": [0.5, 1.5],
        "boolean": [True, False],
    }
    values.extend(guesses.get(schema.get("type", ""), []))
    return values


def changed_body(field: str) -> dict[str, Any] | None:
    """BASE_BODY with only `field` given another valid value; None when it has just one."""
    base = TaskCreate.model_validate(BASE_BODY).model_dump(mode="json")
    for value in _candidates(_SCHEMA["properties"][field]):
        body = {**BASE_BODY, field: value}
        try:
            request = TaskCreate.model_validate(body)
        except ValueError:
            continue
        if request.model_dump(mode="json") != base:
            return body
    return None


def same_request_spelled_out(field: str) -> dict[str, Any]:
    """BASE_BODY with `field` set explicitly to the one value it may take."""
    base = TaskCreate.model_validate(BASE_BODY).model_dump(mode="json", by_alias=True)
    body = {**BASE_BODY, field: base.get(field)}  # an omitted optional field is null
    assert TaskCreate.model_validate(body).model_dump(mode="json", by_alias=True) == base
    return body


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_changes_the_fingerprint(field: str) -> None:
    """Two requests that differ in one field never share a fingerprint."""
    body = changed_body(field)
    base = fingerprint(TaskCreate.model_validate(BASE_BODY))
    if body is None:
        # A field with one allowed value: spelling it out is the same request.
        assert fingerprint(TaskCreate.model_validate(same_request_spelled_out(field))) == base
    else:
        assert fingerprint(TaskCreate.model_validate(body)) != base


@pytest_asyncio.fixture(loop_scope="session")
async def service(service_factory: Any, settings: Settings) -> Service:
    """The service, talking to an in-process simulator."""
    transport, _ = simulator_transport()
    built: Service = await service_factory(settings, transport)
    return built


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("field", FIELDS)
async def test_same_key_with_one_field_changed_is_refused(service: Service, field: str) -> None:
    """Same Idempotency-Key, one field changed: 422 idempotency_key_reused, nothing new sent."""
    headers = {"Idempotency-Key": f"one-field-{field}"}
    first = await service.client.post("/tasks", json=BASE_BODY, headers=headers)
    assert first.status_code == 202, first.text
    body = changed_body(field)
    if body is None:
        again = await service.client.post(
            "/tasks", json=same_request_spelled_out(field), headers=headers
        )
        assert again.status_code == 202, again.text
        assert again.json()["id"] == first.json()["id"]
        return
    reused = await service.client.post("/tasks", json=body, headers=headers)
    assert reused.status_code == 422, reused.text
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert await service.sql("SELECT count(*) FROM tasks") == [(1,)]
