"""`imagetasks events`: the event feed, or (with --follow) the live stream."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from app.client.api import ApiClient
from app.client.errors import UNREACHABLE, CliError, reporting
from app.client.output import err, out

RECONNECT_SECONDS = 2.0


def _line(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    parts = [str(event["created_at"])[:23].replace("T", " "), f"{event['type']:<16}", data["id"]]
    if event["type"].startswith("endpoint."):  # about a webhook endpoint, not a task
        return "  ".join([*parts, str(data.get("url")), f"({data.get('disabled_reason')})"])
    parts.append(f"{data.get('status')} {data.get('progress')}%")
    if "image_index" in data:
        image: dict[str, Any] = next(
            (i for i in data.get("images") or [] if i.get("index") == data["image_index"]), {}
        )
        parts.append(f"image {data['image_index']}: {image.get('url') or image.get('status')}")
    return "  ".join(parts)


def _show(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(event, separators=(",", ":")))
    else:
        out.print(_line(event), markup=False)


def events(
    after: Annotated[
        str | None, typer.Option(help="Start after this cursor (a next_cursor or stream id).")
    ] = None,
    types: Annotated[
        str | None, typer.Option(help="Comma-separated types, e.g. task.completed,image.stored.")
    ] = None,
    every_task: Annotated[
        bool, typer.Option("--all", help="Every task's events, not only this token's.")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events as they happen.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON event per line.")] = False,
    url: Annotated[
        str, typer.Option("--url", envvar="IMAGETASKS_URL", help="The service's base URL.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="IMAGETASKS_TOKEN", help="A bearer token from API_TOKENS."),
    ] = None,
) -> None:
    """Print the event log from a cursor (with --follow, then live, resuming on reconnect)."""
    params: dict[str, Any] = {"scope": "all" if every_task else "mine"}
    if types:
        params["types"] = types
    cursor = after
    with reporting(), ApiClient(url, token) as client:
        if not follow:
            while True:
                page = client.events({**params, "after": cursor} if cursor else params)
                for event in page["items"]:
                    _show(event, as_json)
                cursor = page["next_cursor"] or cursor
                if not page["has_more"]:
                    break
            if cursor:
                err.print(f"next: --after {cursor}", markup=False)
            return
        while True:
            try:
                for cursor_seen, event in client.stream_events(params, cursor):
                    _show(event, as_json)
                    cursor = cursor_seen
            except CliError as exc:
                if exc.exit_code != UNREACHABLE:
                    raise
                err.print(f"{exc.message}; reconnecting", markup=False)
            # The stream ended (the service stopped or restarted): resume where it left off.
            time.sleep(RECONNECT_SECONDS)
