"""/docs works without internet, and the schema explains every field and parameter."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from app.services.events import EventType
from tests.conftest import Service, make_settings
from tests.helpers import simulator_transport

pytestmark = pytest.mark.asyncio(loop_scope="session")
RESPONSE_MODELS = ("TaskPublic", "ImagePublic", "TaskPage", "ErrorBody", "ErrorDetail", "ErrorInfo")


async def build(service_factory: Any, sqlite_url: str, tmp_path: Path, **overrides: Any) -> Service:
    """The service on SQLite with an in-process simulator."""
    settings = make_settings(sqlite_url, tmp_path, **overrides)
    service: Service = await service_factory(settings, simulator_transport()[0])
    return service


async def test_docs_load_their_assets_from_the_service(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """The Swagger UI page names only same-origin scripts and styles, and they are served."""
    service = await build(service_factory, sqlite_url, tmp_path)
    page = await service.client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets, page.text
    assert not [url for url in assets if "://" in url or url.startswith("//")]
    for url in assets:
        asset = await service.client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000


async def test_docs_assets_carry_the_root_path(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Behind a path prefix the page points at the prefixed asset URLs."""
    service = await build(service_factory, sqlite_url, tmp_path, root_path="/imagetasks")
    page = await service.client.get("/docs")
    scripts = re.findall(r'src="([^"]+)"', page.text)
    assert scripts
    assert all(url.startswith("/imagetasks/") for url in scripts)


async def test_every_response_field_and_query_parameter_is_described(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Response models describe each field, states are enums, and list filters are explained."""
    service = await build(service_factory, sqlite_url, tmp_path)
    schema = (await service.client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    undescribed = [
        f"{model}.{name}"
        for model in RESPONSE_MODELS
        for name, field in components[model]["properties"].items()
        if not field.get("description")
    ]
    assert undescribed == []
    assert components["TaskStatus"]["enum"] == [
        "submitting",
        "pending",
        "processing",
        "completed",
        "failed",
        "cancelled",
    ]
    assert components["ImageStatus"]["enum"] == ["pending", "stored", "failed"]
    assert components["TaskPublic"]["examples"][0]["image"]["status"] == "stored"
    parameters = schema["paths"]["/tasks"]["get"]["parameters"]
    assert {p["name"] for p in parameters if not p.get("description")} == set()
    by_name = {p["name"]: p for p in parameters}
    status_choices = by_name["status"]["schema"]["anyOf"][0]["enum"]
    assert "completed" in status_choices
    assert by_name["image_status"]["schema"]["anyOf"][0]["enum"] == ["pending", "stored", "failed"]


async def test_every_public_field_and_parameter_of_every_route_is_described(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """No route is left out: events, webhook endpoints and images too, fixed values as enums."""
    service = await build(service_factory, sqlite_url, tmp_path)
    schema = (await service.client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    undescribed_fields = [
        f"{model}.{name}"
        for model, body in components.items()
        for name, field in body.get("properties", {}).items()
        if not field.get("description")
    ]
    assert undescribed_fields == []
    undescribed_parameters = [
        f"{method.upper()} {path} {parameter['in']} {parameter['name']}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
        if not parameter.get("description")
    ]
    assert undescribed_parameters == []

    def has_examples(body: dict[str, Any]) -> bool:
        fields = body.get("properties", {}).values()
        return bool(body.get("examples")) or any(field.get("examples") for field in fields)

    without_examples = [
        model
        for model, body in components.items()
        if "properties" in body and not has_examples(body)
    ]
    assert without_examples == []

    def enum_of(model: str, field: str) -> list[str | None]:
        prop = components[model]["properties"][field]
        for choice in [prop, *prop.get("anyOf", []), prop.get("items", {})]:
            if "$ref" in choice:
                choice = components[choice["$ref"].rsplit("/", 1)[1]]
            if "enum" in choice:
                return list(choice["enum"])
        raise AssertionError(f"{model}.{field} is not an enum: {prop}")

    assert enum_of("EventPublic", "type") == [kind.value for kind in EventType]
    assert enum_of("DeliveryPublic", "status") == ["pending", "delivered", "failed"]
    assert enum_of("EndpointPublic", "disabled_reason") == ["gone", "failing", "caller", None]
