"""The typer commands `submit`, `list`, `show`, `image`, `events` and `listen`, and their
registration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app.client.api import ApiClient
from app.client.errors import EXIT_CODES, FAILED, CliError, reporting
from app.client.events import events
from app.client.listen import listen
from app.client.output import err, image_rows, out, print_fields, print_task_table
from app.client.progress import MAX_WAIT_SECONDS, wait_until_settled

UrlOption = Annotated[
    str, typer.Option("--url", envvar="IMAGETASKS_URL", help="The service's base URL.")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="IMAGETASKS_TOKEN", help="A bearer token from API_TOKENS."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _metadata(pairs: list[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="'--metadata'")
        result[key] = value
    return result


def submit(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What to draw.")],
    size: Annotated[str | None, typer.Option(help="1:1, 2:3, 3:2, 1024x1024, …")] = None,
    quality: Annotated[str | None, typer.Option(help="low, medium or high.")] = None,
    image_url: Annotated[
        list[str] | None,
        typer.Option("--image-url", metavar="URL", help="An https reference image; repeatable."),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="Kept with the task (string values); repeatable."),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retrying with the same key returns the same task.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Wait until it is settled (the service answers then: Prefer: wait)."
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after seconds.")] = 600,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Submit an image generation; print the task id (with --wait, the stored image)."""
    body: dict[str, Any] = {"prompt": prompt, "metadata": _metadata(metadata or [])}
    for name, value in (("size", size), ("quality", quality), ("image_urls", image_url)):
        if value:
            body[name] = value
    with reporting(), ApiClient(url, token) as client:
        if not wait:
            out.print(client.submit(body, idempotency_key)["id"], markup=False)
            return
        first_wait = max(1, min(MAX_WAIT_SECONDS, int(timeout)))
        task = client.submit(body, idempotency_key, wait=first_wait)
        task = wait_until_settled(client, task, timeout=timeout)
        print_fields([("task", task["id"]), ("status", task["status"]), *image_rows(task)])


def list_tasks(
    status: Annotated[str | None, typer.Option(help="pending, processing, completed, …")] = None,
    image_status: Annotated[str | None, typer.Option(help="pending, stored or failed.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List tasks, newest first."""
    params = {"status": status, "image_status": image_status, "limit": limit, "cursor": cursor}
    with reporting(), ApiClient(url, token) as client:
        page = client.tasks({k: v for k, v in params.items() if v is not None})
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    print_task_table(page["items"])
    if page.get("next_cursor"):
        err.print(f"more: --cursor {page['next_cursor']}", markup=False)


def show(
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Show one task and its image."""
    with reporting(), ApiClient(url, token) as client:
        task = client.task(task_id)
    if as_json:
        typer.echo(json.dumps(task, indent=2))
        return
    error = task.get("error")
    print_fields(
        [
            ("task", task["id"]),
            ("status", f"{task['status']} ({task['progress']}%)"),
            ("error", f"{error['code']}: {error['message']}") if error else None,
            ("prompt", task["prompt"]),
            ("size", task.get("size")),
            ("quality", task.get("quality")),
            ("metadata", json.dumps(task["metadata"])) if task.get("metadata") else None,
            ("upstream", task.get("upstream_task_id")),
            ("created", task["created_at"]),
            ("completed", task.get("completed_at")),
            *image_rows(task),
        ]
    )


def image(
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write ('-': stdout).")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Download a task's stored image, checked against its sha256."""
    with reporting(), ApiClient(url, token) as client:
        task = client.task(task_id)
        sha256 = (task.get("image") or {}).get("sha256")
        if not sha256:
            state = (task.get("image") or {}).get("status") or f"none (task is {task['status']})"
            raise CliError(f"the image is not stored yet (image status: {state})", FAILED)
        client.download(task_id, sha256, output)
    if str(output) != "-":
        size = output.stat().st_size
        err.print(f"wrote {size} bytes to {output}, sha256 verified", markup=False)


def register(cli: typer.Typer) -> None:
    """Add the client commands to the `imagetasks` app."""
    commands = (
        ("submit", submit),
        ("list", list_tasks),
        ("show", show),
        ("image", image),
        ("events", events),
        ("listen", listen),
    )
    known = {info.name for info in cli.registered_commands}
    for name, command in commands:
        if name not in known:  # main() may run more than once in one process (tests)
            cli.command(name, epilog=EXIT_CODES)(command)
