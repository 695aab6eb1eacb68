"""`imagetasks listen --forward-to URL`: the live stream, forwarded as signed webhooks.

Like `stripe listen`: each event is POSTed to a local URL exactly as the service
would send it (Standard Webhooks headers, signed with the token's default
secret), with one status line per event, so a receiver can be built and tested
without a public address.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer

from app.client.api import ApiClient
from app.client.errors import UNREACHABLE, USAGE, CliError, reporting
from app.client.output import err, out
from app.webhooks import signing

RECONNECT_SECONDS = 2.0
FORWARD_TIMEOUT_SECONDS = 15.0


def forward(
    http: httpx.Client, url: str, secret: str, event: dict[str, Any]
) -> tuple[int | None, str]:
    """POST one event signed; its status code (None: no answer) and a short outcome."""
    body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    headers = signing.headers([secret], str(event["id"]), int(time.time()), body)
    started = time.monotonic()
    try:
        response = http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return None, f"failed: {type(exc).__name__}: {exc}"[:200]
    took = (time.monotonic() - started) * 1000
    return response.status_code, f"{response.status_code} ({took:.0f} ms)"


def listen(
    forward_to: Annotated[
        str, typer.Option("--forward-to", help="The local URL each event is POSTed to.")
    ],
    types: Annotated[
        str | None, typer.Option(help="Comma-separated types, e.g. image.stored,image.failed.")
    ] = None,
    after: Annotated[
        str | None, typer.Option(help="Start after this cursor (default: new events only).")
    ] = None,
    url: Annotated[
        str, typer.Option("--url", envvar="IMAGETASKS_URL", help="The service's base URL.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="IMAGETASKS_TOKEN", help="A bearer token from API_TOKENS."),
    ] = None,
) -> None:
    """Forward this token's events, signed, to a local URL as they happen."""
    target = httpx.URL(forward_to)
    if target.scheme not in ("http", "https") or not target.host:
        raise CliError(f"--forward-to must be an http(s) URL, not {forward_to!r}", USAGE)
    params: dict[str, Any] = {"scope": "mine"}
    if types:
        params["types"] = types
    with (
        reporting(),
        ApiClient(url, token) as client,
        httpx.Client(
            timeout=FORWARD_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
        ) as http,
    ):
        secret = client.request("GET", "/webhook-endpoints/default/secret")["secret"]
        cursor = after if after is not None else _end_of_log(client, params)
        err.print(
            f"Ready: forwarding events to {forward_to}, signed with your default secret\n"
            f"  {secret}\n(Ctrl-C to stop)",
            markup=False,
        )
        while True:
            try:
                for seen, event in client.stream_events(params, cursor):
                    _, outcome = forward(http, forward_to, secret, event)
                    stamp = str(event["created_at"])[:19].replace("T", " ")
                    out.print(
                        f"{stamp}  --> {event['type']:<16} [{event['id']}]  <-- {outcome}",
                        markup=False,
                    )
                    cursor = seen
            except CliError as exc:
                if exc.exit_code != UNREACHABLE:
                    raise
                err.print(f"{exc.message}; reconnecting", markup=False)
            time.sleep(RECONNECT_SECONDS)


def _end_of_log(client: ApiClient, params: dict[str, Any]) -> str | None:
    """Page to the end of the log: listening starts with what happens from now on."""
    cursor: str | None = None
    while True:
        page = client.events({**params, "limit": 500, **({"after": cursor} if cursor else {})})
        cursor = page.get("next_cursor") or cursor
        if not page.get("has_more"):
            return cursor
