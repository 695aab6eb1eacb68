"""The service's /tasks and /events API for the client: requests, and its answers as
CliErrors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import httpx

from app.client.errors import AUTH, FAILED, UNREACHABLE, USAGE, CliError

Task = dict[str, Any]


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

    def submit(
        self, body: dict[str, Any], idempotency_key: str | None = None, *, wait: int | None = None
    ) -> Task:
        """POST /tasks; with `wait`, the answer comes once the task settles (or after wait s)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        task: Task = self.request("POST", "/tasks", json=body, **_waiting(wait, headers))
        return task

    def task(self, task_id: str, *, wait: int | None = None) -> Task:
        """GET /tasks/{id}; with `wait`, the answer comes once the task settles (or in wait s)."""
        path = f"/tasks/{quote(task_id, safe='')}"
        task: Task = self.request("GET", path, **_waiting(wait, {}))
        return task

    def events(self, params: dict[str, Any]) -> dict[str, Any]:
        """One page of GET /events."""
        page: dict[str, Any] = self.request("GET", "/events", params=params)
        return page

    def stream_events(
        self, params: dict[str, Any], last_event_id: str | None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """GET /events/stream: (cursor, event) pairs as they come, until the stream ends."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        # Heartbeats come every 15 s: a minute of silence means the connection is gone.
        timeout = httpx.Timeout(30.0, read=60.0)
        try:
            with self.http.stream(
                "GET", "/events/stream", params=params, headers=headers, timeout=timeout
            ) as response:
                if not response.is_success:
                    response.read()
                    raise api_error(response)
                cursor, data = "", ""
                for line in response.iter_lines():
                    if line.startswith("id: "):
                        cursor = line.removeprefix("id: ")
                    elif line.startswith("data: "):
                        data = line.removeprefix("data: ")
                    elif line == "" and data:
                        yield cursor, json.loads(data)
                        data = ""
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

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


def _waiting(wait: int | None, headers: dict[str, str]) -> dict[str, Any]:
    """Request options for a `Prefer: wait` call: the header, and a timeout beyond the wait."""
    if wait is None:
        return {"headers": headers}
    return {"headers": {**headers, "Prefer": f"wait={wait}"}, "timeout": wait + 30.0}


def _same_sha256(got: str, expected: str) -> None:
    if got != expected:
        raise CliError(f"sha256 mismatch: got {got}, the task says {expected}", FAILED)
