"""Where the client writes: results to stdout, progress and messages to stderr."""

from __future__ import annotations

from rich.cells import cell_len, set_cell_size
from rich.console import Console

from app.client.api import Task

Row = tuple[str, object] | None

out = Console(soft_wrap=True, highlight=False)
# soft_wrap: a message carrying a cursor or an id is never broken across lines.
err = Console(stderr=True, highlight=False, soft_wrap=True)


def printable(value: object) -> str:
    """The text with control characters escaped (\\n, \\x1b...): a prompt or a provider's
    message cannot move the cursor, recolour the terminal or forge a line of output."""
    return "".join(
        char if char.isprintable() or char == " " else char.encode("unicode_escape").decode()
        for char in str(value)
    )


def print_fields(rows: list[Row]) -> None:
    """Aligned `label value` lines on stdout, never wrapped (easy to grep)."""
    for row in rows:
        if row is not None and row[1] is not None:
            out.print(f"{row[0]:<11}{printable(row[1])}", markup=False)


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


_COLUMNS = ("id", "status", "image", "created (UTC)", "prompt")
_GAP = "  "
_MIN_PROMPT = 4  # "a b…": the prompt yields its room first


def _task_cells(task: Task) -> tuple[str, ...]:
    image = (task.get("image") or {}).get("status") or "-"
    progress = f" {task['progress']}%" if task["status"] == "processing" else ""
    created = str(task["created_at"])[:16].replace("T", " ")
    prompt = printable(" ".join(str(task["prompt"]).split()))  # one line per task
    return (task["id"], task["status"] + progress, image, created, prompt)


def print_task_table(tasks: list[Task]) -> None:
    """Aligned columns on stdout. Ids are never shortened, so they can be copied into
    `show`; on a terminal only the prompt is cut to fit, and piped output keeps it whole."""
    rows = [_COLUMNS, *(_task_cells(task) for task in tasks)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    fixed = sum(widths) + len(_GAP) * len(widths)
    room = max(out.width - fixed, _MIN_PROMPT) if out.is_terminal else None
    for row in rows:
        prompt = row[-1]
        if room is not None and cell_len(prompt) > room:
            # Cut by terminal columns, not characters: CJK and emoji take two each.
            prompt = set_cell_size(prompt, room - 1).rstrip() + "…"
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.print(_GAP.join([*cells, prompt]).rstrip(), markup=False, soft_wrap=True)
