"""Log lines are structured, carry their context, and never carry secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from app.callback_urls import sign
from app.config import Settings
from app.logging import configure_logging, redact_text
from tests.conftest import API_TOKEN, WEBHOOK_SECRET, Service, make_settings
from tests.helpers import simulator_transport


@pytest.fixture
def log_stream(sqlite_url: str, tmp_path: Path) -> Iterator[io.StringIO]:
    """JSON logging into a buffer; the defaults come back afterwards."""
    settings: Settings = make_settings(sqlite_url, tmp_path, log_format="json")
    configure_logging(settings)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_callback_tokens_and_bearer_tokens_are_redacted_in_text() -> None:
    """Paths keep the task id but lose the token; bearer credentials vanish."""
    assert (
        redact_text("POST /base/webhooks/starmagic/tsk_1/0123abcd HTTP/1.1")
        == "POST /base/webhooks/starmagic/tsk_1/*** HTTP/1.1"
    )
    assert redact_text("Authorization: Bearer s3cr3t-token") == "Authorization: Bearer ***"


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("auth=BEARER s3cr3t-token", "s3cr3t-token"),
        ("auth=bEaReR\ts3cr3t-token", "s3cr3t-token"),
        ("key whsec_c2VjcmV0LXNpZ25pbmcta2V5 in a message", "c2VjcmV0LXNpZ25pbmcta2V5"),
        ('{"url": "https://x/webhooks/starmagic/tsk_9/tok3n-value?x=1"}', "tok3n-value"),
    ],
)
def test_every_spelling_of_a_secret_passes_the_quick_check(text: str, hidden: str) -> None:
    """Text without any trace of a secret skips the redaction; these must not."""
    assert hidden not in redact_text(text)
    assert "***" in redact_text(text)


def test_text_without_secrets_is_left_as_it_is() -> None:
    text = "GET /tasks?status=completed bearing 42 webhooks"
    assert redact_text(text) is text


def test_structured_lines_carry_context_and_hide_secret_fields(log_stream: io.StringIO) -> None:
    """Bound context appears on the line; secret-named fields and tokens do not."""
    log = structlog.get_logger("tests")
    with structlog.contextvars.bound_contextvars(request_id="req-1", task_id="tsk_1"):
        log.info(
            "callback_received",
            path="/webhooks/starmagic/tsk_1/deadbeefdeadbeef",
            api_key="sk-live-123",
            authorization="Bearer abc.def",
        )
    (line,) = lines(log_stream)
    assert line["event"] == "callback_received"
    assert (line["request_id"], line["task_id"], line["level"]) == ("req-1", "tsk_1", "info")
    text = json.dumps(line)
    for secret in ("deadbeefdeadbeef", "sk-live-123", "abc.def"):
        assert secret not in text


def test_foreign_library_lines_are_redacted_too(log_stream: io.StringIO) -> None:
    """uvicorn-style %-formatted messages pass the same redactor."""
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/1.1" %d', "127.0.0.1", "POST", "/webhooks/starmagic/tsk_9/cafe1234", 200
    )
    (line,) = lines(log_stream)
    assert "cafe1234" not in json.dumps(line)
    assert "/webhooks/starmagic/tsk_9/***" in str(line["event"])


@pytest.mark.asyncio(loop_scope="session")
async def test_access_lines_carry_the_request_id_and_no_callback_token(
    log_stream: io.StringIO, service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """Each request logs one access line with its id; webhook tokens are hidden."""
    service: Service = await service_factory(
        make_settings(sqlite_url, tmp_path / "svc"), simulator_transport()[0]
    )
    await service.client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    token = sign("tsk_unknown", WEBHOOK_SECRET)
    await service.client.post(f"/webhooks/starmagic/tsk_unknown/{token}", content=b"{}")
    access = [line for line in lines(log_stream) if line.get("event") == "request"]
    health = next(line for line in access if line["path"] == "/healthz")
    assert (health["request_id"], health["status"], health["method"]) == ("trace-42", 200, "GET")
    hook = next(line for line in access if str(line["path"]).startswith("/webhooks/"))
    assert hook["status"] == 404
    assert token not in log_stream.getvalue()


def test_configured_secret_values_are_redacted_wherever_they_appear(
    log_stream: io.StringIO,
) -> None:
    """A secret quoted in a message or an exception text is replaced, whatever its field."""
    log = structlog.get_logger("tests")
    try:
        raise ValueError(f"upstream refused key {API_TOKEN}")
    except ValueError:
        log.exception("odd_failure", detail=f"secret was {WEBHOOK_SECRET}")
    (line,) = lines(log_stream)
    text = json.dumps(line)
    assert "upstream refused key ***" in str(line["exception"])
    assert line["detail"] == "secret was ***"
    assert API_TOKEN not in text
    assert WEBHOOK_SECRET not in text


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("confirm", [True, False])
async def test_a_callback_writes_one_line_at_info(
    log_stream: io.StringIO, service_factory: Any, sqlite_url: str, tmp_path: Path, confirm: bool
) -> None:
    """The request line is the callback's line: what it did, its status and its duration."""
    settings = make_settings(sqlite_url, tmp_path / "svc", confirm_callbacks=confirm)
    service: Service = await service_factory(settings, simulator_transport()[0])
    service.runtime.confirms_in_process = False  # the worker's query is not the callback's
    created = await service.client.post("/tasks", json={"prompt": "a quiet lake"})
    task = created.json()
    body = {
        "code": 200,
        "data": {"id": task["upstream_task_id"], "status": "failed", "progress": 0},
    }
    token = sign(task["id"], WEBHOOK_SECRET)
    answer = await service.client.post(
        f"/webhooks/starmagic/{task['id']}/{token}",
        json=body,
        headers={"X-Request-ID": "callback-1"},
    )
    assert answer.status_code == 200
    mine = [line for line in lines(log_stream) if line.get("request_id") == "callback-1"]
    assert [(line["event"], line["level"]) for line in mine] == [("callback_received", "info")]
    (line,) = mine
    outcome = "confirming" if confirm else "applied"
    assert (line["task_id"], line["status"], line["outcome"]) == (task["id"], 200, outcome)
    assert line["reported"] == "failed"
    assert line.get("task_status") == (None if confirm else "failed")
    assert isinstance(line["duration_ms"], float)
    assert token not in log_stream.getvalue()


def test_alembic_plugin_setup_is_not_logged(log_stream: io.StringIO) -> None:
    """Alembic announces its plugins at INFO when the first readiness check reads the
    migration scripts: seven lines of noise in a request's context, kept out."""
    logging.getLogger("alembic.runtime.plugins").info("setup plugin %s", "alembic.x")
    logging.getLogger("app.anything").info("kept")
    assert "setup plugin" not in log_stream.getvalue()
    assert "kept" in log_stream.getvalue()


def test_the_quick_check_never_changes_what_the_patterns_redact() -> None:
    """Over many mixes of case, separators, encodings and look-alike letters, text is
    redacted exactly as the three patterns alone would redact it."""
    from app.logging import _BEARER, _CALLBACK_TOKEN, _SIGNING_SECRET

    def patterns_only(text: str) -> str:
        text = _SIGNING_SECRET.sub("***", text)
        return _BEARER.sub(r"\1***", _CALLBACK_TOKEN.sub(r"\1***", text))

    heads = ["bearer", "BEARER", "BeArEr", "bear er", "bearer\u00a0", "bearer\t", "Bearer:"]
    heads += ["whsec_", "WHSEC_", "whsec-", "/webhooks/starmagic/tsk_1/", "/WEBHOOKS/starmagic/"]
    heads += ["/webhooks%2Fstarmagic/tsk_1/", "/webhooks/starmagic/tsk 1/", "\u212aey "]
    tails = ["s3cr3t", " s3cr3t", "\u00a0s3cr3t", "tok?x=1", '"tok"', "", "c2Vj+/=_-"]
    around = [("", ""), ("Authorization: ", ""), ('{"u": "https://h', '"}'), ("x\n", "\ny")]
    checked = 0
    for head in heads:
        for tail in tails:
            for before, after in around:
                text = f"{before}{head}{tail}{after}"
                assert redact_text(text) == patterns_only(text), text
                checked += 1
    assert checked == len(heads) * len(tails) * len(around)


def test_any_other_handler_gets_the_app_lines_already_redacted(log_stream: io.StringIO) -> None:
    """The app's own lines are redacted before they reach the handlers: another handler
    on the root logger (an agent's, a file an operator adds, pytest's capture) never
    sees a callback token or a bearer credential; ours still hides traceback text."""
    other = io.StringIO()
    handler = logging.StreamHandler(other)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    log = structlog.get_logger("tests")
    log.info("request", path="/webhooks/starmagic/tsk_1/deadbeefdeadbeef", auth="Bearer abc.def")
    try:
        raise RuntimeError("calling /webhooks/starmagic/tsk_2/feedfacefeedface failed")
    except RuntimeError:
        log.exception("failed")
    for text in (other.getvalue(), log_stream.getvalue()):
        assert "deadbeefdeadbeef" not in text
        assert "abc.def" not in text
    assert "feedfacefeedface" not in log_stream.getvalue()
    assert "/webhooks/starmagic/tsk_2/***" in log_stream.getvalue()
