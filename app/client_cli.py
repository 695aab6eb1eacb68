"""`imagetasks submit|list|show|image`: talk to a running service, for people and scripts.

Results go to stdout, progress and errors to stderr, so `--json` output pipes cleanly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote, urlsplit

import httpx
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

OK, FAILED, USAGE, AUTH, UNREACHABLE = 0, 1, 2, 3, 4
EXIT_CODES = (
    "Exit codes: 0 ok; 1 task failed, image not stored, or not found; "
    "2 usage or validation error; 3 token refused; 4 service unreachable."
)
Task = dict[str, Any]
Row = tuple[str, object] | None
# Given the service's view of a pending task, a fresher (label, progress), if known.
Peek = Callable[[Task], tuple[str, int] | None]

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="IMAGETASKS_URL", help="The service's base URL.")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="IMAGETASKS_TOKEN", help="A bearer token from API_TOKENS."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A failure to report as one message (plus detail lines) and an exit code."""

    def __init__(self, message: str, exit_code: int, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.lines = message, exit_code, lines or []


def api_error(response: httpx.Response) -> CliError:
    """Translate the service's `{"error": {...}}` answer into a CliError."""
    try:
        error = response.json()["error"]
        message, details = str(error["message"]), list(error.get("details") or [])
    except (ValueError, KeyError, TypeError):
        message, details = response.text[:200] or response.reason_phrase, []
    if response.status_code == 401:
        return CliError("the service refused the token (set IMAGETASKS_TOKEN or --token)", AUTH)
    if response.status_code == 422:
        lines = [f"{item.get('field', '?')}: {item.get('reason', 'invalid')}" for item in details]
        return CliError("invalid request:", USAGE, lines or [message])
    if response.status_code == 404:
        return CliError(message, FAILED)
    return CliError(f"the service answered {response.status_code}: {message}", FAILED)


class ApiClient:
    """The service's /tasks API over a sync httpx client; every failure is a CliError."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        if urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).netloc:
            raise CliError(f"--url must be an http(s) URL, not {url!r}", USAGE)
        headers = {"User-Agent": "imagetasks-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.TransportError) -> CliError:
        reason = str(exc) or type(exc).__name__
        return CliError(f"cannot reach imagetasks at {self.url}: {reason}", UNREACHABLE)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON of a successful answer."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if not response.is_success:
            raise api_error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(f"{self.url} did not answer like imagetasks", FAILED) from exc

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> Task:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        task: Task = self.request("POST", "/tasks", json=body, headers=headers)
        return task

    def task(self, task_id: str) -> Task:
        task: Task = self.request("GET", f"/tasks/{quote(task_id, safe='')}")
        return task

    def tasks(self, params: dict[str, Any]) -> dict[str, Any]:
        page: dict[str, Any] = self.request("GET", "/tasks", params=params)
        return page

    def _copy_image(self, task_id: str, sink: BinaryIO) -> str:
        """Stream the stored image into `sink`; returns its sha256."""
        digest = hashlib.sha256()
        path = f"/tasks/{quote(task_id, safe='')}/image"
        try:
            # httpx drops Authorization if the service redirects to another origin (S3).
            with self.http.stream("GET", path, follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    raise api_error(response)
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    sink.write(chunk)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return digest.hexdigest()

    def download(self, task_id: str, sha256: str, dest: Path) -> None:
        """Write the stored image to `dest` ('-': stdout) only if its sha256 matches."""
        if str(dest) == "-":
            buffer = io.BytesIO()
            _same_sha256(self._copy_image(task_id, buffer), sha256)
            sys.stdout.buffer.write(buffer.getvalue())
            return
        # Spool beside the destination, so the file appears whole or not at all.
        part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            with part.open("wb") as sink:
                _same_sha256(self._copy_image(task_id, sink), sha256)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)


def _same_sha256(got: str, expected: str) -> None:
    if got != expected:
        raise CliError(f"sha256 mismatch: got {got}, the task says {expected}", FAILED)


@contextmanager
def reporting() -> Iterator[None]:
    """Turn a CliError into its message on stderr and its exit code."""
    try:
        yield
    except CliError as exc:
        typer.echo(f"imagetasks: {exc.message}", err=True)
        for line in exc.lines:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(exc.exit_code) from None


def _phase(task: Task, peek: Peek | None) -> tuple[str, float, bool]:
    """Description, bar percentage, and whether the image is stored; CliError on failure."""
    # Generation fills 90% of the bar; storing the image is the last stretch.
    status, image = task["status"], task.get("image") or {}
    if status in ("failed", "cancelled"):
        error = task.get("error") or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        raise CliError(f"task {task['id']} {status}{reason}", FAILED)
    if status != "completed":
        seen = peek(task) if peek else None
        label, progress = seen or (status, int(task.get("progress") or 0))
        return label, progress * 0.9, False
    if image.get("status") == "failed":
        error = image.get("error") or {}
        raise CliError(
            f"task {task['id']} completed but its image could not be stored: "
            f"{error.get('code')}: {error.get('message')}",
            FAILED,
        )
    stored = image.get("status") == "stored"
    return ("stored" if stored else "completed, storing the image"), (100 if stored else 90), stored


def wait_for_image(
    client: ApiClient,
    task_id: str,
    *,
    timeout: float,
    interval: float = 0.5,
    peek: Peek | None = None,
) -> Task:
    """Poll the task with a live bar on stderr until its image is stored."""
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description:<30}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err) as progress:
        bar = progress.add_task("submitted", total=100)
        while True:
            task = client.task(task_id)
            label, percent, stored = _phase(task, peek)
            progress.update(bar, description=label, completed=percent)
            if stored:
                return task
            if time.monotonic() > deadline:
                raise CliError(
                    f"gave up after {timeout:g} s: task {task_id} is still {label} "
                    f"(see `imagetasks show {task_id}`)",
                    FAILED,
                )
            time.sleep(interval)


def print_fields(rows: list[Row]) -> None:
    """Aligned `label value` lines on stdout, never wrapped (easy to grep)."""
    for row in rows:
        if row is not None and row[1] is not None:
            out.print(f"{row[0]:<11}{row[1]}", markup=False)


def image_rows(task: Task) -> list[Row]:
    """Where the image is and what it is."""
    image = task.get("image") or {}
    width, height = image.get("width"), image.get("height")
    error = image.get("error") or {}
    return [
        ("image", image.get("status")),
        ("url", image.get("url")),
        ("size", f"{image['size_bytes']} bytes ({image.get('content_type')})")
        if image.get("size_bytes") is not None
        else None,
        ("dimensions", f"{width}x{height}") if width and height else None,
        ("sha256", image.get("sha256")),
        ("image err", f"{error.get('code')}: {error.get('message')}") if error else None,
    ]


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
        bool, typer.Option("--wait", help="Follow it until the image is stored.")
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
        task = client.submit(body, idempotency_key)
        if not wait:
            out.print(task["id"], markup=False)
            return
        task = wait_for_image(client, task["id"], timeout=timeout)
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
    table = Table("id", "status", "image", "created (UTC)", "prompt", box=box.SIMPLE_HEAD)
    for column in table.columns:
        column.no_wrap, column.overflow = True, "ellipsis"
    for task in page["items"]:
        image = (task.get("image") or {}).get("status") or "-"
        progress = f" {task['progress']}%" if task["status"] == "processing" else ""
        created = str(task["created_at"])[:16].replace("T", " ")
        table.add_row(task["id"], task["status"] + progress, image, created, task["prompt"][:40])
    Console(highlight=False).print(table)
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
    commands = (("submit", submit), ("list", list_tasks), ("show", show), ("image", image))
    known = {info.name for info in cli.registered_commands}
    for name, command in commands:
        if name not in known:  # main() may run more than once in one process (tests)
            cli.command(name, epilog=EXIT_CODES)(command)
