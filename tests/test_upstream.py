"""Parsing the provider's loose payloads, and the client's retry rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.models import TaskStatus
from app.upstream import (
    RetryPolicy,
    SnapshotError,
    StarMagicClient,
    UpstreamError,
    UpstreamNotFound,
    UpstreamOutcomeUnknown,
    UpstreamRejected,
    UpstreamUnavailable,
    parse_snapshot,
)
from tests.helpers import task_body

on_loop = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("envelope", [True, False])
def test_completed_snapshot_in_either_shape(envelope: bool) -> None:
    """Envelope or bare, the same typed snapshot comes out."""
    snapshot = parse_snapshot(task_body("completed", envelope=envelope))
    assert snapshot.status is TaskStatus.COMPLETED
    assert snapshot.upstream_id == "task-unified-1757156493-imcg5zqt"
    assert snapshot.progress == 100
    assert snapshot.image_url == "https://cdn.example.com/out.png"
    assert snapshot.images[0].expires_at == datetime(2100, 1, 1, tzinfo=UTC)
    assert snapshot.completed_at == datetime.fromtimestamp(1757156593, UTC)


def test_the_published_shape_gives_every_result_and_no_expiry() -> None:
    """A bare task with `results: [url, …]`: each URL an image, in order, expiry unknown."""
    links = ["https://cdn.example.com/1.png", "https://cdn.example.com/2.png"]
    snapshot = parse_snapshot(task_body("completed", urls=links, published=True))
    assert snapshot.status is TaskStatus.COMPLETED
    assert [image.url for image in snapshot.images] == links
    assert [image.expires_at for image in snapshot.images] == [None, None]
    assert snapshot.can_cancel is False


def test_a_realistic_published_callback_parses() -> None:
    """The provider's documented task object, extra fields and all."""
    body = {
        "id": "task-unified-1757156493-k9m2xpvw",
        "object": "image.generation.task",
        "type": "image",
        "model": "gpt-image-1.5",
        "status": "completed",
        "progress": 100,
        "created": 1757156493,
        "results": ["https://files.example.net/out/k9m2xpvw.png"],
        "task_info": {"can_cancel": False},
        "something_new": {"nested": [1, 2]},
    }
    snapshot = parse_snapshot(body)
    assert snapshot.upstream_id == "task-unified-1757156493-k9m2xpvw"
    assert snapshot.image_url == "https://files.example.net/out/k9m2xpvw.png"
    assert snapshot.completed_at is None


def test_a_published_failure_keeps_its_code() -> None:
    """`error: {code, message, type: task_error}`: the code is the provider's own."""
    error = {"code": "content_policy_violation", "message": "refused", "type": "task_error"}
    snapshot = parse_snapshot(task_body("failed", published=True, error=error))
    assert (snapshot.error_code, snapshot.error_message) == ("content_policy_violation", "refused")
    assert snapshot.images == ()


def test_usage_is_kept_from_the_submit_answer() -> None:
    """billing_rule, credits_reserved and user_group survive; junk does not."""
    body = {
        "id": "task-unified-1757156493-imcg5zqt",
        "status": "pending",
        "usage": {"billing_rule": "per_call", "credits_reserved": 2.5, "user_group": "default"},
    }
    assert parse_snapshot(body).usage == {
        "billing_rule": "per_call",
        "credits_reserved": 2.5,
        "user_group": "default",
    }
    odd = {"status": "pending", "usage": {"credits_reserved": "lots", "x": 1}}
    assert parse_snapshot(odd).usage is None


def test_image_url_as_a_list_takes_the_first_string() -> None:
    """`images[].url` has been seen as a list of strings."""
    body = task_body("completed", url=[None, "https://a.example/1.png", "https://b/2.png"])
    assert parse_snapshot(body).image_url == "https://a.example/1.png"


@pytest.mark.parametrize(
    "payload",
    [
        {"status": "processing"},
        {"status": "processing", "progress": "40"},
        {"status": "processing", "progress": None, "result": "??", "task_info": 3},
        {"code": 200, "data": {"status": "pending", "task_info": {"estimated_time": 90}}},
        {"status": "completed", "result": {"images": []}},
        {"status": "completed", "result": {"images": [{"url": 7, "expires_at": "soon"}]}},
    ],
)
def test_missing_and_odd_fields_do_not_break_parsing(payload: dict[str, Any]) -> None:
    """Every field may be missing or of a surprising type; status alone is required."""
    snapshot = parse_snapshot(payload)
    assert snapshot.status.value == (payload.get("data") or payload)["status"]
    assert snapshot.progress in (None, 40)
    assert snapshot.image_url is None


def test_failed_snapshot_keeps_the_providers_reason() -> None:
    """The error object's code and message survive."""
    body = task_body("failed", error={"code": "nsfw", "message": "content policy"})
    snapshot = parse_snapshot(body)
    assert (snapshot.error_code, snapshot.error_message) == ("nsfw", "content policy")
    assert snapshot.image_url is None


def test_values_a_database_cannot_keep_are_cleaned_or_dropped() -> None:
    """NUL and lone surrogates leave the text; absurd estimates are ignored."""
    body = {
        "status": "failed",
        "estimated_time": "1e30",
        "error": {"code": "x\x00y", "message": "bad \ud800 thing"},
    }
    snapshot = parse_snapshot(body)
    assert snapshot.estimated_time is None
    assert snapshot.error_code == "xy"
    assert snapshot.error_message == "bad ? thing"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "completed",
        {},
        {"status": "done"},
        {"status": "submitting"},
        {"code": 404},
        {"status": "pending", "id": "task\x00id"},
        {"status": "pending", "id": "../../etc"},
    ],
)
def test_non_snapshots_are_refused(payload: Any) -> None:
    """No status, an unknown status or an error envelope is not a snapshot."""
    with pytest.raises(SnapshotError):
        parse_snapshot(payload)


def client_for(handler: Any, attempts: int = 3) -> tuple[StarMagicClient, list[httpx.Request]]:
    """A client over a scripted transport, recording every request."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        response: httpx.Response = handler(request, len(seen))
        return response

    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    policy = RetryPolicy(attempts=attempts, base_delay=0, max_delay=0)
    return StarMagicClient(http, base_url="https://sm.test", api_key="k", retry=policy), seen


@on_loop
async def test_submit_honours_retry_after_then_succeeds() -> None:
    """A 429 with Retry-After is waited out and retried."""

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {}})
        return httpx.Response(200, json={"id": "task-1", "status": "pending"})

    client, seen = client_for(handler)
    snapshot = await client.submit({"prompt": "p"})
    assert snapshot.upstream_id == "task-1"
    assert len(seen) == 2
    assert seen[0].headers["authorization"] == "Bearer k"


@on_loop
async def test_submit_does_not_wait_out_an_unreasonable_retry_after() -> None:
    """A Retry-After beyond the bound fails at once instead of hanging the caller."""
    client, seen = client_for(lambda r, n: httpx.Response(429, headers={"Retry-After": "3600"}))
    with pytest.raises(UpstreamUnavailable):
        await client.submit({"prompt": "p"})
    assert len(seen) == 1


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
@on_loop
async def test_submit_refusals_are_not_retried(status: int) -> None:
    """4xx other than 429 raise at once, keeping the provider's message."""
    body = {"error": {"code": "bad", "message": f"no ({status})", "type": "x"}}
    client, seen = client_for(lambda r, n: httpx.Response(status, json=body))
    with pytest.raises(UpstreamRejected) as caught:
        await client.submit({"prompt": "p"})
    assert caught.value.message == f"no ({status})"
    assert caught.value.status_code == status
    assert len(seen) == 1


@pytest.mark.parametrize(
    "failure",
    [
        lambda r, n: httpx.Response(500, json={"error": {"code": "internal_error"}}),
        lambda r, n: httpx.Response(502, text="bad gateway"),
        lambda r, n: httpx.Response(504, text="gateway timeout"),
        lambda r, n: httpx.Response(200, text="<html>not json</html>"),
        lambda r, n: httpx.Response(200, json={"status": "pending"}),
    ],
)
@on_loop
async def test_submit_outcomes_that_may_have_been_billed_are_never_resent(failure: Any) -> None:
    """500, gateway errors and unreadable 200s mean 'unknown': one request, no retry."""
    client, seen = client_for(failure)
    with pytest.raises(UpstreamOutcomeUnknown):
        await client.submit({"prompt": "p"})
    assert len(seen) == 1


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError, httpx.ReadError]
)
@on_loop
async def test_submit_after_sending_is_never_resent(exc: type[httpx.TransportError]) -> None:
    """A transport failure after the request went out is an unknown outcome."""

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        raise exc("lost", request=request)

    client, seen = client_for(handler)
    with pytest.raises(UpstreamOutcomeUnknown):
        await client.submit({"prompt": "p"})
    assert len(seen) == 1


@on_loop
async def test_submit_connection_failures_are_retried_then_reported() -> None:
    """Connection refused on every attempt: tried `attempts` times, then unavailable."""

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client, seen = client_for(handler, attempts=4)
    with pytest.raises(UpstreamUnavailable):
        await client.submit({"prompt": "p"})
    assert len(seen) == 4


@on_loop
async def test_query_retries_transient_failures() -> None:
    """Queries retry on 5xx and transport errors, then parse the answer."""

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.ReadTimeout("slow", request=request)
        if n == 2:
            return httpx.Response(500)
        return httpx.Response(200, json=task_body("processing", progress=30))

    client, seen = client_for(handler)
    snapshot = await client.query("task-1")
    assert snapshot.progress == 30
    assert [request.url.path for request in seen] == ["/v1/tasks/task-1"] * 3


@on_loop
async def test_query_not_found_is_its_own_error() -> None:
    """A 404 from the query API is not retried and says so."""
    client, seen = client_for(lambda r, n: httpx.Response(404, json={"message": "no task"}))
    with pytest.raises(UpstreamNotFound):
        await client.query("task-x")
    assert len(seen) == 1


def test_backoff_is_bounded_and_jittered() -> None:
    """Delays grow, never pass the cap, and are not all equal."""
    policy = RetryPolicy(base_delay=0.5, max_delay=4)
    delays = [policy.backoff(attempt) for attempt in range(8) for _ in range(5)]
    assert max(delays) <= 4
    assert min(delays) >= 0.25
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, "UpstreamCancelUnsupported"),
        (405, "UpstreamCancelUnsupported"),
        (400, "UpstreamRejected"),
        (500, "UpstreamUnavailable"),
        (429, "UpstreamUnavailable"),
    ],
)
@on_loop
async def test_cancel_errors_say_what_happened(status: int, error: str) -> None:
    """No route (404/405) is 'unsupported', 400 a refusal, 5xx and 429 'try later'."""
    client, seen = client_for(lambda r, n: httpx.Response(status, json={"error": {"code": "x"}}))
    with pytest.raises(UpstreamError) as caught:
        await client.cancel("task-unified-1-abc")
    assert type(caught.value).__name__ == error
    assert [request.method for request in seen] == ["DELETE"]


@on_loop
async def test_cancel_answer_is_a_cancelled_snapshot() -> None:
    """The draft's answer `{id, object: task.cancelled, status: cancelled}` parses."""
    answer = {"id": "task-unified-1-abc", "object": "task.cancelled", "status": "cancelled"}
    client, seen = client_for(lambda r, n: httpx.Response(200, json=answer))
    snapshot = await client.cancel("task-unified-1-abc")
    assert snapshot.status is TaskStatus.CANCELLED
    assert seen[0].url.path == "/v1/tasks/task-unified-1-abc"
