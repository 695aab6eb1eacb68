"""Hostile input against the running service: requests generated from its own OpenAPI
schema (schemathesis), webhook bodies that are not task snapshots, and slow clients.

The module's cluster runs on PostgreSQL (what production runs: it refuses some
strings SQLite stores) and polls only after ten quiet minutes, so nothing but
the requests sent here changes a task while a test compares snapshots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
import schemathesis
from hypothesis import assume
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from app.middleware import MAX_BODY_BYTES
from app.upstream import SnapshotError, parse_snapshot
from tests.chaos.cluster import SECOND_TOKEN, TABLES, Cluster
from tests.chaos.conftest import ClusterPool, Figures
from tests.chaos.fuzz import Case, FuzzRun, fuzz_bodies, fuzz_schema, json_values
from tests.e2e.stack import API_TOKEN, wait_for

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

FUZZ_EXAMPLES = 150  # per batch; four batches
BODY_EXAMPLES = 80  # per kind of webhook body
SLOW_CLIENTS = 20
SLOW_PROMPT = "a glacier, slowly [sim:eta=50000]"  # processing for 1000 s: the target


@dataclass
class Hostile:
    """The module's cluster, a task still processing and a completed one."""

    cluster: Cluster
    processing: dict[str, Any]
    completed: dict[str, Any]
    schema: Any


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hostile(module_clusters: ClusterPool) -> Hostile:
    """A quiet cluster with one processing and one completed task, and its OpenAPI schema."""
    cluster = await module_clusters.start("postgres", replicas=1, RECONCILE_AFTER_SECONDS=600)
    processing = await cluster.submit(SLOW_PROMPT)
    completed = await cluster.submit("a finished drawing")
    await cluster.wait_image(completed["id"], timeout=60)
    raw = (await cluster.client.get("/openapi.json")).json()
    return Hostile(
        cluster, processing, completed, schema=schemathesis.openapi.from_dict(answering_now(raw))
    )


def answering_now(raw: dict[str, Any]) -> dict[str, Any]:
    """The schema without what holds a request open on purpose (the live stream, a
    stream asked for with Accept, Prefer: wait): those are tested on their own."""
    held_open = {"accept", "prefer", "last-event-id"}
    paths = {path: item for path, item in raw["paths"].items() if path != "/events/stream"}
    for item in paths.values():
        for operation in item.values():
            operation["parameters"] = [
                parameter
                for parameter in operation.get("parameters", [])
                if parameter["name"].lower() not in held_open
            ]
    return {**raw, "paths": paths}


def with_token(token: str | None) -> Callable[[Case], None]:
    """Set (or remove, for None) the case's bearer token."""

    def prepare(case: Case) -> None:
        # A new mapping, not an edit in place: schemathesis tracks its own containers.
        headers = CaseInsensitiveDict(
            {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        )
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        case.headers = headers

    return prepare


def invalid_with_token(schema: Any) -> Callable[[Case], None]:
    """A valid token on cases made invalid elsewhere (a missing token is not the point here)."""
    set_token = with_token(API_TOKEN)

    def prepare(case: Case) -> None:
        assume(not schema.is_security_param_negated(case))
        set_token(case)

    return prepare


def keep_generated_token(case: Case) -> None:
    """Leave schemathesis's own random bearer token (never a valid one) in place."""
    for name, value in case.headers.items():
        if name.lower() == "authorization":
            assert API_TOKEN not in str(value)
            assert SECOND_TOKEN not in str(value)


def provider_answer(case: Case, status: int) -> bool:
    """502/503 are documented for POST /tasks: the provider refused or is unreachable."""
    return case.method.upper() == "POST" and case.path == "/tasks" and status in (502, 503)


def nothing_allowed(case: Case, status: int) -> bool:
    """No 5xx is acceptable."""
    return False


async def state(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table."""
    return {name: await cluster.table(name) for name in TABLES}


async def settle(cluster: Cluster) -> None:
    """Wait until every task but the slow one has finished and its image settled."""

    async def quiet() -> bool:
        rows = await cluster.query(
            "SELECT count(*) FROM tasks WHERE prompt <> :slow AND (status IN "
            "('submitting', 'pending', 'processing') OR image_status = 'pending')",
            slow=SLOW_PROMPT,
        )
        return bool(rows[0][0] == 0)

    await wait_for(quiet, timeout=120, interval=0.5, what="the fuzzed tasks to settle")


def fuzz_in_thread(hostile: Hostile, **kwargs: Any) -> Any:
    """Run ``fuzz_schema`` off the event loop against replica 0."""
    return asyncio.to_thread(fuzz_schema, hostile.schema, hostile.cluster.service_url, **kwargs)


async def test_fuzzed_requests_with_a_valid_token_never_get_a_500(
    hostile: Hostile, figures: Figures
) -> None:
    """Valid and invalid requests to every route, with a valid token: no 5xx, errors shaped."""
    known = {"task_id": hostile.completed["id"]}
    runs: list[FuzzRun] = []
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        runs.append(
            await fuzz_in_thread(
                hostile,
                mode=mode,
                examples=FUZZ_EXAMPLES,
                prepare=with_token(API_TOKEN),
                allowed_5xx=provider_answer,
                path_parameters=known,
            )
        )
    figures.record(
        "fuzz_with_token",
        cases=sum(run.cases for run in runs),
        answers=dict(sum((run.statuses for run in runs), Counter())),
        routes=dict(sum((run.by_route for run in runs), Counter())),
    )
    for run in runs:
        assert run.server_errors == []
        assert run.bad_error_bodies == []
    assert hostile.cluster.service.running


async def test_refused_requests_change_nothing(hostile: Hostile, figures: Figures) -> None:
    """Requests without a token, with a wrong one, or invalid by the schema change no row."""
    cluster = hostile.cluster
    await settle(cluster)
    before = await state(cluster)
    submits = (await cluster.sim.stats())["submit_requests"]
    known = {"task_id": hostile.processing["id"]}
    batches = {
        "no token": (schemathesis.GenerationMode.POSITIVE, with_token(None)),
        "wrong token": (schemathesis.GenerationMode.POSITIVE, keep_generated_token),
        "invalid, with a token": (
            schemathesis.GenerationMode.NEGATIVE,
            invalid_with_token(hostile.schema),
        ),
    }
    runs: dict[str, FuzzRun] = {}
    for name, (mode, prepare) in batches.items():
        runs[name] = await fuzz_in_thread(
            hostile,
            mode=mode,
            examples=FUZZ_EXAMPLES,
            prepare=prepare,
            allowed_5xx=nothing_allowed,
            path_parameters=known,
        )
    after = await state(cluster)
    figures.record(
        "fuzz_refused",
        cases=sum(run.cases for run in runs.values()),
        answers={name: dict(run.statuses) for name, run in runs.items()},
    )
    for name, run in runs.items():
        assert run.server_errors == [], name
        assert run.bad_error_bodies == [], name
        assert run.accepted_writes == [], (name, run.accepted_writes)
    for name in ("no token", "wrong token"):
        # No /tasks call succeeds without a valid token; most never get past the 401.
        passed = [
            f"{route} -> {status}"
            for (route, status) in runs[name].route_statuses
            if route.split(" ")[1].startswith("/tasks") and status < 400
        ]
        assert passed == [], name
        refused = sum(
            n
            for (route, status), n in runs[name].route_statuses.items()
            if route.split(" ")[1].startswith("/tasks") and status == 401
        )
        assert refused > 0, name
    assert after == before
    assert (await cluster.sim.stats())["submit_requests"] == submits


# -- webhook bodies -------------------------------------------------------------------


def is_snapshot(value: Any) -> bool:
    """True when the service's own parser would take ``value`` as a task snapshot."""
    try:
        parse_snapshot(value)
    except SnapshotError:
        return False
    else:
        return True


def deep(depth: int) -> bytes:
    """A JSON array nested ``depth`` levels."""
    return b"[" * depth + b"]" * depth


def deep_object(depth: int) -> bytes:
    """A snapshot whose ``result`` is an object nested ``depth`` levels."""
    inner = '{"a":' * depth + "1" + "}" * depth
    return f'{{"status": "processing", "progress": 50, "result": {inner}}}'.encode()


def huge_json() -> bytes:
    """A valid snapshot just over the 1 MiB body limit."""
    padding = "x" * MAX_BODY_BYTES
    return json.dumps({"status": "processing", "progress": 60, "note": padding}).encode()


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """``data`` in pieces, sent without a Content-Length (chunked)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def snapshot_body(progress: int = 70) -> bytes:
    """A valid processing snapshot (would be news for the slow task)."""
    return json.dumps(
        {"code": 200, "data": {"status": "processing", "progress": progress}}
    ).encode()


WRONG_SHAPES: list[Any] = [
    {},
    [],
    "completed",
    42,
    None,
    {"status": "submitting"},
    {"status": "done"},
    {"status": 3},
    {"status": ["processing"]},
    {"code": 500, "data": {"status": "processing", "progress": 80}},
    {"code": "oops", "data": {"status": "nope"}},
    {"data": {"status": "processing", "id": 12345}},
    {"data": {"status": "processing", "id": "x" * 200}},
    {"data": "processing"},
]
WRONG_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "image/png",
    "application/octet-stream",
]


async def test_hostile_webhook_bodies_get_4xx_and_change_nothing(
    hostile: Hostile, figures: Figures
) -> None:
    """Random bytes, deep or huge JSON, wrong content types, wrong shapes: 4xx, no change."""
    cluster = hostile.cluster
    url = cluster.callback_url(hostile.processing["id"])
    answers: Counter[int] = Counter()
    unexpected: list[str] = []

    def post(content: Any, content_type: str | None = "application/json") -> int:
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            response = client.post(url, content=content, headers=headers)
        except httpx.TransportError as exc:  # cut off mid-body after a refusal
            unexpected.append(f"transport error {type(exc).__name__}")
            return 0
        answers[response.status_code] += 1
        if not 400 <= response.status_code < 500:
            unexpected.append(f"{response.status_code} for {str(content)[:80]!r}")
        return response.status_code

    def send_bytes(value: bytes) -> None:
        with contextlib.suppress(ValueError, RecursionError):
            assume(not is_snapshot(json.loads(value)))
        post(value)

    def send_json(value: Any) -> None:
        assume(not is_snapshot(value))
        post(json.dumps(value).encode())

    def everything() -> dict[str, int]:
        fuzz_bodies(st.binary(max_size=2048), BODY_EXAMPLES, send_bytes)
        fuzz_bodies(json_values(), BODY_EXAMPLES, send_json)
        for shape in WRONG_SHAPES:
            post(json.dumps(shape).encode())
        fixed = {
            "deep array": post(deep(100_000)),
            "deep object in a snapshot": post(deep_object(5_000)),
            "huge, with Content-Length": post(huge_json()),
            "huge, chunked": post(chunks(huge_json())),
            "empty": post(b""),
            "not UTF-8": post(b'{"status": "\xff\xfe"}'),
            "NUL in the status": post(b'{"status": "processing\\u0000", "progress": 5}'),
        }
        for content_type in WRONG_TYPES:
            fixed[content_type] = post(snapshot_body(), content_type)
        return fixed

    before = await state(cluster)
    with httpx.Client(timeout=30, trust_env=False) as client:
        fixed = await asyncio.to_thread(everything)
    after = await state(cluster)
    figures.record(
        "webhook_bodies", requests=sum(answers.values()), answers=dict(answers), fixed=fixed
    )
    assert unexpected == []
    assert fixed["huge, with Content-Length"] == 413
    assert fixed["huge, chunked"] == 413
    assert fixed["deep array"] == 400
    assert all(fixed[content_type] == 415 for content_type in WRONG_TYPES)
    assert after == before


# -- slow clients ---------------------------------------------------------------------


async def trickle(port: int, path: str, started: asyncio.Event, stop: asyncio.Event) -> bool:
    """Send a callback one byte at a time until told to stop; True if the body got out."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    body = snapshot_body(progress=90)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        await writer.drain()
        started.set()
        for index in range(len(body)):
            if stop.is_set():
                return False
            writer.write(body[index : index + 1])
            await writer.drain()
            await asyncio.sleep(0.25)
        return True
    except ConnectionError:
        return False
    finally:
        writer.close()


async def test_slow_clients_do_not_delay_other_requests(hostile: Hostile, figures: Figures) -> None:
    """While 20 clients trickle callback bodies, other callbacks and API calls are answered."""
    cluster = hostile.cluster
    port = int(cluster.service_url.rsplit(":", 1)[1])
    path = cluster.callback_url(hostile.processing["id"]).removeprefix(cluster.service_url)
    stop = asyncio.Event()
    starts = [asyncio.Event() for _ in range(SLOW_CLIENTS)]
    slow = [asyncio.create_task(trickle(port, path, s, stop)) for s in starts]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 30)
        began = time.monotonic()
        health = [await cluster.client.get("/healthz") for _ in range(10)]
        task = await cluster.client.get(f"/tasks/{hostile.completed['id']}")
        duplicate = await cluster.post_callback(
            hostile.completed["id"], {"status": "completed", "progress": 100}
        )
        answered_after = time.monotonic() - began
        still_trickling = [not job.done() for job in slow]
    finally:
        stop.set()
        finished = await asyncio.gather(*slow)
    figures.record(
        "slow_clients",
        slow_clients=SLOW_CLIENTS,
        other_requests=len(health) + 2,
        seconds_for_the_others=round(answered_after, 2),
    )
    assert [r.status_code for r in health] == [200] * len(health)
    assert task.status_code == 200
    assert duplicate.status_code == 200
    # Ordering, not timing: everything else was answered while every body still trickled.
    assert all(still_trickling)
    assert not any(finished)


# -- strings a database cannot store --------------------------------------------------

JSON = {"Content-Type": "application/json"}


def cursor_for(task_id: str) -> str:
    """A cursor in the service's own format, pointing at ``task_id``."""
    raw = json.dumps(["2026-01-01T00:00:00+00:00", task_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


NUL = chr(0)
SURROGATE = chr(0xD800)
# Each once made a 500 on PostgreSQL (NUL) or on both databases (lone surrogates).
NASTY: list[Any] = [
    pytest.param("POST", "/tasks", {"json": {"prompt": f"a{NUL}b"}}, id="NUL in the prompt"),
    pytest.param("GET", "/tasks/a%00b", {}, id="NUL in a task id"),
    pytest.param("GET", "/tasks/a%00b/image", {}, id="NUL in a task id (image)"),
    pytest.param("POST", "/tasks/a%00b/image/retry", {}, id="NUL in a task id (retry)"),
    pytest.param("GET", f"/tasks?cursor={cursor_for(f'a{NUL}b')}", {}, id="NUL in a cursor"),
    pytest.param(
        "GET", f"/tasks?cursor={cursor_for(f'a{SURROGATE}b')}", {}, id="surrogate in a cursor"
    ),
    pytest.param(
        "POST", "/tasks", {"content": b'{"prompt": "a\\ud800b"}', "headers": JSON},
        id="surrogate in the prompt",
    ),
    pytest.param(
        "POST", "/tasks", {"json": {"prompt": "a", "metadata": {"k": f"x{NUL}"}}},
        id="NUL in metadata",
    ),
    pytest.param("GET", "/tasks/" + "x" * 5000, {}, id="very long task id"),
    pytest.param("GET", "/tasks/%FF%FE", {}, id="invalid UTF-8 in a task id"),
    pytest.param(
        "POST", "/tasks", {"json": {"prompt": "x" * 6001}}, id="prompt over 6000 bytes"
    ),
    pytest.param(
        "POST", "/tasks", {"json": {"prompt": "x", "metadata": {"k": "v" * 5000}}},
        id="metadata over 4 KiB",
    ),
]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def nasty_cluster(module_clusters: ClusterPool) -> Cluster:
    """A cluster of its own: a poisoned row must not spoil the other tests' cluster."""
    return await module_clusters.start("postgres", replicas=1, RECONCILE_AFTER_SECONDS=600)


@pytest.mark.parametrize(("method", "path", "request_kwargs"), NASTY)
async def test_strings_the_database_cannot_store_get_4xx(
    nasty_cluster: Cluster, method: str, path: str, request_kwargs: dict[str, Any]
) -> None:
    """NUL, lone surrogates, oversized values: a 4xx, nothing sent to the provider."""
    cluster = nasty_cluster
    submits = (await cluster.sim.stats())["submit_requests"]
    # A fresh connection each time: after a 500 the server closes the one it answered on.
    async with httpx.AsyncClient(
        base_url=cluster.service_url, headers=dict(cluster.client.headers), trust_env=False
    ) as client:
        response = await client.request(method, path, **request_kwargs)
    assert 400 <= response.status_code < 500, response.text
    assert (await cluster.sim.stats())["submit_requests"] == submits


async def test_surrogate_in_metadata_is_refused_before_billing(nasty_cluster: Cluster) -> None:
    """Metadata with a lone surrogate gets a 422 and no submission; listing still works."""
    cluster = nasty_cluster
    submits = (await cluster.sim.stats())["submit_requests"]
    body = b'{"prompt": "a cat", "metadata": {"note": "\\ud800"}}'
    async with httpx.AsyncClient(
        base_url=cluster.service_url, headers=dict(cluster.client.headers), trust_env=False
    ) as client:
        created = await client.post("/tasks", content=body, headers=JSON)
    async with httpx.AsyncClient(
        base_url=cluster.service_url, headers=dict(cluster.client.headers), trust_env=False
    ) as client:
        listing = await client.get("/tasks")
    assert listing.status_code == 200
    assert created.status_code == 422
    assert (await cluster.sim.stats())["submit_requests"] == submits


async def test_out_of_range_estimated_time_is_not_a_500(nasty_cluster: Cluster) -> None:
    """A snapshot with an absurd estimated_time is accepted or refused, never a 500."""
    cluster = nasty_cluster
    task = await cluster.submit(SLOW_PROMPT)
    body = {"data": {"status": "processing", "progress": 9, "estimated_time": "1e30"}}
    response = await cluster.post_callback(task["id"], body)
    assert response.status_code < 500, response.text
