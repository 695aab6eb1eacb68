"""Where the client writes: results to stdout, progress and messages to stderr."""

from __future__ import annotations

from rich.console import Console

from app.client.api import Task

Row = tuple[str, object] | None

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False)


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
